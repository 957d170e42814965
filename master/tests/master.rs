//! The master over real HTTP on 127.0.0.1, with real SQLite files in tempdirs.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use udos_core::desired::Resources;
use udos_core::wire::{
    EnrollRequest, Heartbeat, InstanceState, PublishRequest, ReplaceWorkerRequest, RunningInstance,
    SignatureState,
};
use udos_master::api::{InstanceHealth, TokenIssuedBy};
use udos_master::signing;
use udos_master::ClientError;

#[test]
fn publish_numbers_generations_and_dedupes_intent() {
    let env = Env::new();
    let server = env.start();
    let p = publisher(&server);
    let first = publish(&p, 1, vec![service("web", 1, 2), run("ci", 2)]);
    assert_eq!((first.generation, first.created), (1, true));
    assert_eq!(first.intent_hash.len(), 64);
    // Same intent, specs in another order: same generation, nothing created.
    let again = publish(&p, 1, vec![run("ci", 2), service("web", 1, 2)]);
    assert_eq!((again.generation, again.created), (1, false));
    assert_eq!(again.intent_hash, first.intent_hash);
    let second = publish(&p, 2, vec![service("web", 3, 2), service("db", 4, 1)]);
    assert_eq!((second.generation, second.created), (2, true));
    // Rollback: the first intent again becomes active, under its old number.
    let back = publish(&p, 1, vec![service("web", 1, 2), run("ci", 2)]);
    assert_eq!((back.generation, back.created), (1, false));

    let gens = p.generations().unwrap();
    assert_eq!(
        gens.iter()
            .map(|g| (g.generation, g.active))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, false)]
    );
    assert_eq!(gens[0].publisher, "ci-test");
    assert_eq!(gens[0].specs, 2);
    let audit = p.audit().unwrap();
    assert_eq!(
        audit
            .iter()
            .map(|a| (a.generation, a.created))
            .collect::<Vec<_>>(),
        vec![(1, true), (1, false), (2, true), (1, false)]
    );
    assert_eq!(audit[0].remote.as_deref(), Some("127.0.0.1"));
    let detail = p.generation(2).unwrap();
    assert_eq!(detail.commit, commit(2));
    assert_eq!(
        detail
            .specs
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        vec!["db", "web"]
    );
    assert!(!detail.active);

    let d = p.diff(Some(1), Some(2)).unwrap();
    assert_eq!(
        d.added.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec!["db"]
    );
    assert_eq!(
        d.removed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec!["ci"]
    );
    assert_eq!(d.changed.len(), 1);
    assert_eq!(d.changed[0].from_hash, hash(1));
    assert_eq!(d.unchanged, 0);
    // Defaults: to = active (1), from = 0 (nothing): everything added.
    let d = p.diff(None, None).unwrap();
    assert_eq!((d.from, d.to, d.added.len()), (0, 1, 2));
    assert!(matches!(
        p.diff(Some(1), Some(9)),
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(p.generation(9), Err(ClientError::NotFound(_))));
    assert_eq!(p.status().unwrap().generation, 1);
}

#[test]
fn rejected_publication_changes_nothing() {
    let env = Env::new();
    let server = env.start();
    let p = publisher(&server);
    publish(&p, 1, vec![service("web", 1, 1)]);

    let bad = |commit: String, specs| {
        p.publish(&PublishRequest {
            commit,
            specs,
            signature: None,
        })
        .unwrap_err()
    };
    let dup = bad(commit(2), vec![service("a", 1, 1), service("a", 2, 1)]);
    assert!(
        matches!(&dup, ClientError::Rejected(m) if m.contains("`a` appears more than once")),
        "{dup}"
    );
    let mut nohash = service("a", 1, 1);
    nohash.hash.clear();
    let e = bad(commit(2), vec![nohash]);
    assert!(
        matches!(&e, ClientError::Rejected(m) if m.contains("no content hash")),
        "{e}"
    );
    // Workflow paths are joined to the worker's checkout: they must stay inside it.
    for path in ["/etc/passwd", "../../etc/passwd", ".github/../../x.yml"] {
        let mut escaping = run("ci", 1);
        escaping.kind = udos_core::desired::SpecKind::WorkflowRun {
            workflow: path.into(),
            job: None,
            repository: None,
        };
        let e = bad(commit(2), vec![escaping]);
        assert!(
            matches!(&e, ClientError::Rejected(m) if m.contains("relative to the repository")),
            "{path}: {e}"
        );
    }
    let e = bad("not-a-commit".into(), vec![service("a", 1, 1)]);
    assert!(
        matches!(&e, ClientError::Rejected(m) if m.contains("not-a-commit")),
        "{e}"
    );
    assert_eq!(e.status(), Some(400));
    // A spec without a `hash` field at all, and a body that is not JSON.
    let url = format!("{}/v1/publish", server.url());
    let missing = format!(
        r#"{{"commit":"{}","specs":[{{"id":"a","kind":"workflow_run","workflow":"w.yml"}}]}}"#,
        commit(3)
    );
    let (status, body) = raw("POST", &url, Some(PUBLISHER), Some(&missing));
    assert_eq!(status, 400, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(err["error"].as_str().unwrap().contains("hash"), "{body}");
    let (status, body) = raw("POST", &url, Some(PUBLISHER), Some("{half"));
    assert_eq!(status, 400, "{body}");

    let gens = p.generations().unwrap();
    assert_eq!(gens.len(), 1);
    assert!(gens[0].active);
    assert_eq!(p.audit().unwrap().len(), 1);
    assert_eq!(p.status().unwrap().generation, 1);
}

#[test]
fn restart_reloads_state_and_tokens() {
    let env = Env::new();
    let server = env.start();
    let p = publisher(&server);
    publish(&p, 1, vec![service("web", 1, 1)]);
    publish(&p, 2, vec![service("web", 2, 1)]);
    let w = enroll(&server, "w1", &[("zone", "a")]);
    let a = w.converge();
    assert_eq!(a.generation, 2);
    assert_eq!(a.assignments.len(), 1);
    let token = w.token.clone();
    server.shutdown().unwrap();

    let server = env.start();
    let p = publisher(&server);
    let gens = p.generations().unwrap();
    assert_eq!(
        gens.iter()
            .map(|g| (g.generation, g.active))
            .collect::<Vec<_>>(),
        vec![(1, false), (2, true)]
    );
    let w = common::client(&server, &token, "w1.token");
    let a = w.assignment("w1", 0, None).unwrap();
    assert_eq!(a.generation, 2);
    assert_eq!(a.assignments[0].spec.hash, hash(2));
    let st = p.status().unwrap();
    assert_eq!(st.workers.len(), 1);
    assert_eq!(
        st.workers[0].labels.get("zone").map(String::as_str),
        Some("a")
    );
    assert_eq!(st.workers[0].seen_generation, 2);
    assert!(st.workers[0].live);
    assert_eq!(st.converged_instances, 1, "{:?}", st.drift);
    // Numbering goes on after a restart.
    assert_eq!(publish(&p, 3, vec![service("web", 3, 1)]).generation, 3);
}

#[test]
fn tokens_and_roles() {
    let env = Env::new();
    let server = env.start();
    let base = server.url();
    let w1 = enroll(&server, "w1", &[]);
    let w2 = enroll(&server, "w2", &[]);
    publish(&publisher(&server), 1, vec![run("ci", 1)]);
    let hb = serde_json::to_string(&Heartbeat {
        worker_id: "w1".into(),
        seen_generation: 1,
        instances: vec![],
        used: Resources::default(),
    })
    .unwrap();
    let assignment = format!("{base}/v1/assignment?worker=w1");
    // (method, url, token, body, expected status)
    type Case<'a> = (&'a str, String, Option<&'a str>, Option<&'a str>, u16);
    let cases: Vec<Case> = vec![
        // No token → 401 everywhere but healthz and metrics.
        ("POST", format!("{base}/v1/publish"), None, Some("{}"), 401),
        ("POST", format!("{base}/v1/enroll"), None, Some("{}"), 401),
        ("GET", assignment.clone(), None, None, 401),
        ("POST", format!("{base}/v1/heartbeat"), None, Some(&hb), 401),
        ("GET", format!("{base}/v1/status"), None, None, 401),
        ("GET", format!("{base}/v1/generations"), None, None, 401),
        ("GET", format!("{base}/v1/generations/1"), None, None, 401),
        ("GET", format!("{base}/v1/diff"), None, None, 401),
        ("GET", format!("{base}/v1/audit"), None, None, 401),
        ("GET", format!("{base}/healthz"), None, None, 200),
        ("GET", format!("{base}/metrics"), None, None, 200),
        // Unknown tokens → 401.
        (
            "GET",
            assignment.clone(),
            Some("not-a-worker-token"),
            None,
            401,
        ),
        ("GET", format!("{base}/v1/status"), Some("guess"), None, 401),
        // Wrong role → 403.
        (
            "POST",
            format!("{base}/v1/publish"),
            Some(&w1.token),
            Some("{}"),
            403,
        ),
        (
            "POST",
            format!("{base}/v1/publish"),
            Some(ENROLLER),
            Some("{}"),
            403,
        ),
        (
            "POST",
            format!("{base}/v1/enroll"),
            Some(PUBLISHER),
            Some("{}"),
            403,
        ),
        (
            "GET",
            format!("{base}/v1/status"),
            Some(&w1.token),
            None,
            403,
        ),
        (
            "GET",
            format!("{base}/v1/status"),
            Some(ENROLLER),
            None,
            403,
        ),
        (
            "GET",
            format!("{base}/v1/generations"),
            Some(&w1.token),
            None,
            403,
        ),
        (
            "GET",
            format!("{base}/v1/audit"),
            Some(&w1.token),
            None,
            403,
        ),
        ("GET", assignment.clone(), Some(PUBLISHER), None, 403),
        ("GET", assignment.clone(), Some(&w2.token), None, 403),
        (
            "POST",
            format!("{base}/v1/heartbeat"),
            Some(&w2.token),
            Some(&hb),
            403,
        ),
        (
            "GET",
            format!("{base}/v1/generations/1"),
            Some(ENROLLER),
            None,
            403,
        ),
        // Right role.
        ("GET", assignment.clone(), Some(&w1.token), None, 200),
        (
            "POST",
            format!("{base}/v1/heartbeat"),
            Some(&w1.token),
            Some(&hb),
            200,
        ),
        (
            "GET",
            format!("{base}/v1/generations/1"),
            Some(&w1.token),
            None,
            200,
        ),
        (
            "GET",
            format!("{base}/v1/generations/1"),
            Some(PUBLISHER),
            None,
            200,
        ),
        // Unknown things → 404, bad input → 400.
        (
            "GET",
            format!("{base}/v1/assignment?worker=ghost"),
            Some(&w1.token),
            None,
            404,
        ),
        (
            "GET",
            format!("{base}/v1/generations/7"),
            Some(&w1.token),
            None,
            404,
        ),
        (
            "GET",
            format!("{base}/v1/generations/x"),
            Some(PUBLISHER),
            None,
            400,
        ),
        (
            "GET",
            format!("{base}/v1/nothing"),
            Some(PUBLISHER),
            None,
            404,
        ),
        (
            "GET",
            format!("{base}/v1/assignment"),
            Some(&w1.token),
            None,
            400,
        ),
        (
            "POST",
            format!("{base}/v1/enroll"),
            Some(ENROLLER),
            Some(r#"{"worker_id":"a b","labels":{},"capacity":{"cpu_millis":1,"memory_mib":1}}"#),
            400,
        ),
    ];
    for (method, url, token, body, want) in cases {
        let (status, text) = raw(method, &url, token, body);
        assert_eq!(status, want, "{method} {url} with {token:?}: {text}");
        if status >= 400 {
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
            assert!(v["error"].is_string(), "{text}");
        }
    }
    // The client turns them into instructions.
    let stale = common::client(&server, "stale", "/etc/udos/worker.token");
    let e = stale.assignment("w1", 0, None).unwrap_err();
    assert_eq!(e.status(), Some(401));
    let text = e.to_string();
    assert!(
        text.contains("/etc/udos/worker.token") && text.contains("re-enroll"),
        "{text}"
    );
    let e = w1.client.status().unwrap_err();
    assert!(matches!(e, ClientError::Forbidden { .. }), "{e}");
}

fn enrollment(id: &str, zone: &str) -> EnrollRequest {
    EnrollRequest {
        worker_id: id.into(),
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        capacity: Resources {
            cpu_millis: 1000,
            memory_mib: 1000,
        },
    }
}

#[test]
fn an_enrolled_worker_cannot_be_taken_over_with_the_enrollment_token() {
    let env = Env::new();
    let server = env.start();
    let p = publisher(&server);
    let w1 = enroll(&server, "w1", &[("zone", "a")]);
    let zone = |p: &udos_master::Client| {
        let st = p.status().unwrap();
        let w = st.workers.iter().find(|w| w.id == "w1").unwrap();
        w.labels["zone"].clone()
    };
    let issuer = |p: &udos_master::Client| {
        let st = p.status().unwrap();
        let w = st.workers.iter().find(|w| w.id == "w1").unwrap();
        w.token_issued_by
    };
    assert_eq!(issuer(&p), Some(TokenIssuedBy::EnrollmentToken));
    // The enrollment token does not get w1's place, token or labels.
    let e = enroller(&server)
        .enroll(&enrollment("w1", "evil"))
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("replace-worker w1"), "{e}");
    assert!(w1.client.assignment("w1", 0, None).is_ok());
    assert_eq!(zone(&p), "a");

    // Its own token re-enrolls it: a new token, the old one revoked.
    let again = w1.client.enroll(&enrollment("w1", "b")).unwrap();
    assert_eq!(
        w1.client.assignment("w1", 0, None).unwrap_err().status(),
        Some(401)
    );
    let w1b = common::client(&server, &again.token, "w1.token");
    assert!(w1b.assignment("w1", 0, None).is_ok());
    assert_eq!(zone(&p), "b");
    assert_eq!(issuer(&p), Some(TokenIssuedBy::WorkerToken));
    // Another worker's token may not.
    let w2 = enroll(&server, "w2", &[]);
    let e = w2.client.enroll(&enrollment("w1", "evil")).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // The publisher replaces it explicitly (a lost token, a new machine).
    let replaced = p
        .replace_worker("w1", &ReplaceWorkerRequest::default())
        .unwrap();
    assert_eq!(
        w1b.assignment("w1", 0, None).unwrap_err().status(),
        Some(401)
    );
    let w1c = common::client(&server, &replaced.token, "w1.token");
    assert!(w1c.assignment("w1", 0, None).is_ok());
    assert_eq!(zone(&p), "b", "labels are kept unless given");
    assert_eq!(issuer(&p), Some(TokenIssuedBy::Publisher));
    let relabel = ReplaceWorkerRequest {
        labels: Some(BTreeMap::from([("zone".to_string(), "c".to_string())])),
        capacity: None,
    };
    p.replace_worker("w1", &relabel).unwrap();
    assert_eq!(zone(&p), "c");
    // Only the publisher, and only for enrolled ids.
    let none = ReplaceWorkerRequest::default();
    for who in [enroller(&server), w2.client.clone()] {
        let e = who.replace_worker("w1", &none).unwrap_err();
        assert_eq!(e.status(), Some(403), "{e}");
    }
    let e = p.replace_worker("ghost", &none).unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    // A new id still enrolls with the enrollment token.
    enroll(&server, "w3", &[]);
}

#[test]
fn signed_intent_is_required_and_forwarded() {
    let mut env = Env::new();
    let key = signing::parse_signing_key(&"42".repeat(32)).unwrap();
    let other = signing::parse_signing_key(&"43".repeat(32)).unwrap();
    let key_file = env.path("intent.pub");
    std::fs::write(&key_file, signing::public_hex(&key) + "\n").unwrap();
    env.config.intent_pubkey = Some(key_file);
    let server = env.start();
    let p = publisher(&server);
    let specs = vec![run("ci", 1)];
    let intent = udos_core::desired::intent_hash(&commit(1), &specs);
    let attempt = |signature: Option<String>| {
        p.publish(&PublishRequest {
            commit: commit(1),
            specs: specs.clone(),
            signature,
        })
    };
    let e = attempt(None).unwrap_err();
    assert!(
        matches!(&e, ClientError::Rejected(m) if m.contains("signed")),
        "{e}"
    );
    let e = attempt(Some(signing::sign_intent(&other, &intent))).unwrap_err();
    assert!(
        matches!(&e, ClientError::Rejected(m) if m.contains("does not match")),
        "{e}"
    );
    let e = attempt(Some("ab".into())).unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(p.generations().unwrap().is_empty());
    assert!(p.audit().unwrap().is_empty());

    let sig = signing::sign_intent(&key, &intent);
    let ok = attempt(Some(sig.clone())).unwrap();
    assert_eq!(
        (ok.generation, ok.intent_hash.as_str()),
        (1, intent.as_str())
    );
    assert_eq!(ok.signature_state, SignatureState::Verified);
    let gens = p.generations().unwrap();
    assert!(gens[0].signed);
    assert_eq!(gens[0].signature_state, SignatureState::Verified);
    assert_eq!(
        p.status().unwrap().signature_state,
        SignatureState::Verified
    );
    let w = enroll(&server, "w1", &[]);
    let a = w.poll(0);
    assert_eq!(a.signature.as_deref(), Some(sig.as_str()));
    assert_eq!(a.intent_hash.as_deref(), Some(intent.as_str()));
    // What a worker checks: the signature, and that its specs belong to the intent.
    let verifying = signing::parse_verifying_key(&signing::public_hex(&key)).unwrap();
    signing::verify_intent(
        &verifying,
        a.intent_hash.as_deref().unwrap(),
        a.signature.as_deref().unwrap(),
    )
    .unwrap();
    let g = w.client.generation(a.generation).unwrap();
    assert_eq!(g.signature.as_deref(), Some(sig.as_str()));
    assert_eq!(udos_core::desired::intent_hash(&g.commit, &g.specs), intent);
    assert!(g.specs.contains(&a.assignments[0].spec));
}

#[test]
fn a_signature_the_master_cannot_check_is_not_called_signed() {
    let mut env = Env::new();
    let key = signing::parse_signing_key(&"42".repeat(32)).unwrap();
    let other = signing::parse_signing_key(&"43".repeat(32)).unwrap();
    let signed_by = |k: &ed25519_dalek::SigningKey, n: u32, specs: Vec<_>| PublishRequest {
        signature: Some(signing::sign_intent(
            k,
            &udos_core::desired::intent_hash(&commit(n), &specs),
        )),
        commit: commit(n),
        specs,
    };
    // No --intent-pubkey: signatures are kept and forwarded, but not vouched for.
    let server = env.start();
    let p = publisher(&server);
    let r = p.publish(&signed_by(&key, 1, vec![run("ci", 1)])).unwrap();
    assert_eq!(r.signature_state, SignatureState::Unverified);
    let r = p
        .publish(&signed_by(&other, 2, vec![run("ci", 2)]))
        .unwrap();
    assert_eq!(r.signature_state, SignatureState::Unverified);
    let r = publish(&p, 3, vec![run("ci", 3)]);
    assert_eq!(r.signature_state, SignatureState::Unsigned);
    let states = |p: &udos_master::Client| {
        p.generations()
            .unwrap()
            .iter()
            .map(|g| (g.signed, g.signature_state))
            .collect::<Vec<_>>()
    };
    use SignatureState::*;
    assert_eq!(
        states(&p),
        vec![(false, Unverified), (false, Unverified), (false, Unsigned)]
    );
    let g1 = p.generation(1).unwrap();
    assert!(g1.signature.is_some(), "the signature is still forwarded");
    assert_eq!(g1.signature_state, Unverified);
    let d = p.diff(Some(1), Some(3)).unwrap();
    assert_eq!(
        (d.from_signature_state, d.to_signature_state),
        (Unverified, Unsigned)
    );
    p.publish(&signed_by(&key, 1, vec![run("ci", 1)])).unwrap();
    assert_eq!(p.status().unwrap().signature_state, Unverified);
    server.shutdown().unwrap();

    // The same database under a master with the key: checked against it now.
    let key_file = env.path("intent.pub");
    std::fs::write(&key_file, signing::public_hex(&key)).unwrap();
    env.config.intent_pubkey = Some(key_file);
    let server = env.start();
    let p = publisher(&server);
    assert_eq!(
        states(&p),
        vec![(true, Verified), (false, Invalid), (false, Unsigned)]
    );
    assert_eq!(p.status().unwrap().signature_state, Verified);
    // Re-publishing generation 2 signed with the right key replaces its signature.
    let r = p.publish(&signed_by(&key, 2, vec![run("ci", 2)])).unwrap();
    assert_eq!((r.generation, r.signature_state), (2, Verified));
    assert_eq!(states(&p)[1], (true, Verified));
}

#[test]
fn long_poll_returns_when_a_generation_is_published() {
    let env = Env::new();
    let server = env.start();
    let p = publisher(&server);
    publish(&p, 1, vec![run("a", 1)]);
    let w = enroll(&server, "w1", &[]);
    let a = w.converge();
    assert_eq!(a.generation, 1);
    assert_eq!(a.assignments.len(), 1);

    // Nothing changes: the poll is held for its full wait.
    let t = Instant::now();
    let same = w
        .client
        .assignment("w1", 1, Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(same.generation, 1);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    // A publication wakes it at once.
    let client = w.client.clone();
    let poller = std::thread::spawn(move || {
        let t = Instant::now();
        let r = client
            .assignment("w1", 1, Some(Duration::from_secs(30)))
            .unwrap();
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    publish(&p, 2, vec![run("a", 2), run("b", 3)]);
    let (r, waited) = poller.join().unwrap();
    assert_eq!(r.generation, 2);
    assert_eq!(r.assignments.len(), 2);
    assert!(waited < Duration::from_secs(5), "long poll took {waited:?}");
    assert!(
        waited >= Duration::from_millis(400),
        "returned before the publication: {waited:?}"
    );

    // A stale `seen` returns at once, even with a wait.
    let t = Instant::now();
    let r = w
        .client
        .assignment("w1", 1, Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(r.generation, 2);
    assert!(t.elapsed() < Duration::from_secs(2));
    // So does a poll from a worker whose last heartbeat does not report its current
    // assignment (it may have missed a change).
    let t = Instant::now();
    let r = w
        .client
        .assignment("w1", 2, Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(r.generation, 2);
    assert!(t.elapsed() < Duration::from_secs(2));

    // The assignment changing within a generation wakes the poll too: a second worker
    // joins and takes some of w1's instances.
    let specs: Vec<_> = (0..20).map(|i| run(&format!("r{i}"), i)).collect();
    publish(&p, 3, specs);
    let a = w.converge();
    assert_eq!((a.generation, a.assignments.len()), (3, 20));
    let client = w.client.clone();
    let poller = std::thread::spawn(move || {
        let t = Instant::now();
        let r = client
            .assignment("w1", 3, Some(Duration::from_secs(30)))
            .unwrap();
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let w2 = enroll(&server, "w2", &[]);
    let (r, waited) = poller.join().unwrap();
    assert_eq!(r.generation, 3);
    assert!(r.assignments.len() < 20, "nothing moved to w2");
    assert!(waited < Duration::from_secs(5), "long poll took {waited:?}");
    assert!(
        waited >= Duration::from_millis(400),
        "returned before w2 joined: {waited:?}"
    );
    assert_eq!(w2.poll(0).assignments.len() + r.assignments.len(), 20);
}

#[test]
fn poll_hint_is_short_until_workers_converge() {
    let env = Env::new();
    let server = env.start();
    let w = enroll(&server, "w1", &[]);
    // Nothing published: nothing to converge on.
    assert_eq!(w.poll(0).poll_hint, 15); // min(60, lease / 2)
    publish(&publisher(&server), 1, vec![service("web", 1, 1)]);
    let a = w.poll(0);
    assert_eq!(a.poll_hint, 2);
    w.report(&a);
    assert_eq!(w.poll(1).poll_hint, 15);
}

#[test]
fn expired_lease_moves_instances() {
    let mut env = Env::new();
    env.config.lease = Duration::from_secs(2);
    let server = env.start();
    let p = publisher(&server);
    let w1 = enroll(&server, "w1", &[]);
    let w2 = enroll(&server, "w2", &[]);
    let specs: Vec<_> = (0..12).map(|i| run(&format!("r{i}"), i)).collect();
    publish(&p, 1, specs);
    let a1 = w1.converge();
    let a2 = w2.converge();
    assert_eq!(a1.assignments.len() + a2.assignments.len(), 12);
    assert!(!a1.assignments.is_empty() && !a2.assignments.is_empty());
    let st = p.status().unwrap();
    assert_eq!(st.converged_instances, 12, "{:?}", st.drift);
    assert!(p.metrics().unwrap().contains("udos_convergence_ratio 1\n"));

    // w1 keeps heartbeating; w2 goes silent.
    let t = Instant::now();
    let mut moved = None;
    while t.elapsed() < Duration::from_secs(10) {
        let a = w1.poll(1);
        w1.report(&a);
        if a.assignments.len() == 12 {
            moved = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let moved = moved.expect("w2's instances never moved to w1");
    assert!(
        moved >= Duration::from_millis(1500),
        "moved before the lease expired: {moved:?}"
    );
    let st = p.status().unwrap();
    let w2s = st.workers.iter().find(|w| w.id == "w2").unwrap();
    assert!(!w2s.live);
    assert!(w2s.assigned.is_empty());
    assert!(
        st.drift
            .iter()
            .any(|d| d.starts_with("worker w2 last seen")),
        "{:?}",
        st.drift
    );
    assert_eq!(st.converged_instances, 12, "{:?}", st.drift);
    let m = p.metrics().unwrap();
    assert!(m.contains("udos_workers{state=\"live\"} 1\n"), "{m}");
    assert!(m.contains("udos_workers{state=\"dead\"} 1\n"), "{m}");
    // A dead worker gets nothing until it is live again; then it is placed at once.
    let back = w2.poll(1);
    assert!(
        !back.assignments.is_empty(),
        "w2 was not placed again when it came back"
    );
}

#[test]
fn status_explains_drift_and_metrics_expose_gauges() {
    let env = Env::new();
    let server = env.start();
    let p = publisher(&server);
    let w1 = enroll(&server, "w1", &[("zone", "a")]);
    let mut db = service("db", 9, 1);
    db.selector = BTreeMap::from([("zone".to_string(), "c".to_string())]);
    let resp = publish(&p, 1, vec![service("web", 1, 2), db]);
    assert_eq!(resp.unschedulable.len(), 1);
    assert_eq!(resp.unschedulable[0].spec, "db");
    let a = w1.poll(0);
    assert_eq!(a.assignments.len(), 2);
    // w1 runs replica 0 at the desired hash, replica 1 at an old one.
    w1.client
        .heartbeat(&Heartbeat {
            worker_id: "w1".into(),
            seen_generation: 1,
            instances: vec![
                RunningInstance {
                    spec: "web".into(),
                    replica: 0,
                    hash: hash(1),
                    state: InstanceState::Running,
                    uptime_s: 5,
                    snapshot_ids: vec![],
                    message: None,
                    commit: None,
                },
                RunningInstance {
                    spec: "web".into(),
                    replica: 1,
                    hash: hash(7),
                    state: InstanceState::Running,
                    uptime_s: 5,
                    snapshot_ids: vec![],
                    message: None,
                    commit: None,
                },
            ],
            used: Resources::default(),
        })
        .unwrap();
    let st = p.status().unwrap();
    assert_eq!((st.converged_instances, st.desired_instances), (1, 3));
    assert!((st.percent() - 33.3).abs() < 0.01, "{}", st.percent());
    let want_hash = &hash(1)[..12];
    let old_hash = &hash(7)[..12];
    assert!(
        st.drift.contains(&format!(
            "worker w1 runs web@1 hash {old_hash}, wants {want_hash}"
        )),
        "{:?}",
        st.drift
    );
    assert!(
        st.drift
            .contains(&"spec db has no worker matching zone=c".to_string()),
        "{:?}",
        st.drift
    );
    let web = st.specs.iter().find(|s| s.id == "web").unwrap();
    assert_eq!(web.instances[0].state, InstanceHealth::Converged);
    assert_eq!(web.instances[1].state, InstanceHealth::Outdated);

    let m = p.metrics().unwrap();
    for line in [
        "udos_generation 1\n",
        "udos_workers{state=\"live\"} 1\n",
        "udos_workers{state=\"dead\"} 0\n",
        "udos_assignments 2\n",
        "udos_unschedulable 1\n",
        "# TYPE udos_convergence_ratio gauge\n",
        "# TYPE udos_heartbeat_lag_seconds gauge\n",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    assert!(m.contains("udos_convergence_ratio 0.333"), "{m}");
    p.healthz().unwrap();

    // A worker with the zone joins: db is placed on it, no republication needed.
    let w2 = enroll(&server, "w2", &[("zone", "c")]);
    let a2 = w2.poll(0);
    assert!(
        a2.assignments.iter().any(|a| a.spec.id == "db"),
        "{:?}",
        a2.assignments
    );
    assert!(p.status().unwrap().unschedulable.is_empty());
}

#[test]
fn enrollment_is_validated_and_worker_ids_are_per_token() {
    let env = Env::new();
    let server = env.start();
    let e = enroller(&server)
        .enroll(&EnrollRequest {
            worker_id: String::new(),
            labels: BTreeMap::new(),
            capacity: Resources::default(),
        })
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    let w = enroll(&server, "w-1.example", &[("kvm", "true")]);
    assert_eq!(w.token.len(), 64);
    assert_eq!(w.poll(0).generation, 0);
}
