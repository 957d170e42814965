//! HTTPS with a self-signed certificate, and a client trusting it.

mod common;

use common::*;
use udos_master::{Client, ClientError};

#[test]
fn https_with_a_self_signed_certificate() {
    let mut env = Env::new();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = env.path("master.crt");
    let key = env.path("master.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    env.config.tls_cert = Some(cert.clone());
    env.config.tls_key = Some(key);
    let server = env.start();
    let url = server.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    let trusting = Client::new(&url, Some(&cert))
        .unwrap()
        .with_token(PUBLISHER, "publisher.token");
    trusting.healthz().unwrap();
    let out = publish(&trusting, 1, vec![run("ci", 1)]);
    assert_eq!(out.generation, 1);
    let token = Client::new(&url, Some(&cert))
        .unwrap()
        .with_token(ENROLLER, "enroll.token")
        .enroll(&udos_core::wire::EnrollRequest {
            worker_id: "w1".into(),
            labels: Default::default(),
            capacity: udos_core::desired::Resources {
                cpu_millis: 1000,
                memory_mib: 1000,
            },
        })
        .unwrap()
        .token;
    let worker = Client::new(&url, Some(&cert))
        .unwrap()
        .with_token(token, "w1.token");
    let a = worker.assignment("w1", 0, None).unwrap();
    assert_eq!((a.generation, a.assignments.len()), (1, 1));

    // Without the CA the certificate is refused; plain HTTP gets no answer.
    let untrusting = Client::new(&url, None)
        .unwrap()
        .with_token(PUBLISHER, "publisher.token");
    let e = untrusting.status().unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("--ca-cert"), "{e}");
    let plain = Client::new(&url.replace("https://", "http://"), None)
        .unwrap()
        .with_token(PUBLISHER, "publisher.token");
    assert!(plain.status().is_err());
    // A bad CA file is a configuration error that names the file.
    let e = Client::new(&url, Some(&env.path("missing.pem"))).unwrap_err();
    assert!(e.to_string().contains("missing.pem"), "{e}");
}
