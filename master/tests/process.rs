//! The master as a process of its own (this test binary, re-executed), so that a
//! master that aborts or runs out of descriptors fails a test instead of the harness.

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use udos_core::desired::{self, DesiredSpec};
use udos_core::wire::{EnrollRequest, PublishRequest};
use udos_master::{Client, ClientError, ServeConfig};

const CHILD: &str = "master_child_process";
const URL_LINE: &str = "UDOS-MASTER-URL ";
/// A master that allocates without bound hits this instead of the machine's memory.
const ADDRESS_SPACE: u64 = 4 << 30;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn set_limit(resource: rustix::process::Resource, value: Option<u64>) {
    if let Some(v) = value {
        let limit = rustix::process::Rlimit {
            current: Some(v),
            maximum: Some(v),
        };
        rustix::process::setrlimit(resource, limit).expect("setrlimit");
    }
}

/// The body of the master process [`MasterProcess`] starts: a master on the
/// database and tokens of `UDOS_TEST_MASTER_DIR`, until its stdin closes.
#[test]
#[ignore = "the master process the other tests start"]
fn master_child_process() {
    let Ok(dir) = std::env::var("UDOS_TEST_MASTER_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    set_limit(
        rustix::process::Resource::As,
        env_u64("UDOS_TEST_RLIMIT_AS"),
    );
    set_limit(
        rustix::process::Resource::Nofile,
        env_u64("UDOS_TEST_RLIMIT_NOFILE"),
    );
    let mut config = ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("master.db"),
        dir.join("publisher.token"),
        dir.join("enroll.token"),
    );
    if let Some(ms) = env_u64("UDOS_TEST_HEADER_TIMEOUT_MS") {
        config.limits.header_read_timeout = Duration::from_millis(ms);
    }
    let server = udos_master::spawn(config, 2).expect("starting the master");
    println!("{URL_LINE}{}", server.url());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    server.shutdown().unwrap();
}

/// A master process; killed when dropped.
struct MasterProcess {
    child: Child,
    url: String,
}

impl MasterProcess {
    fn start(dir: &Path, vars: &[(&str, String)]) -> Result<Self, String> {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            CHILD,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("UDOS_TEST_MASTER_DIR", dir)
        .env("UDOS_TEST_RLIMIT_AS", ADDRESS_SPACE.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads on after the URL, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have printed the test's name on the same line.
                if let Some((_, url)) = line.split_once(URL_LINE) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => Ok(MasterProcess { child, url }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().map_err(|e| e.to_string())?;
                Err(format!("the master process did not start: {status}"))
            }
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    fn publisher(&self) -> Client {
        client_at(&self.url, PUBLISHER, "publisher.token")
    }
}

impl Drop for MasterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish_specs(c: &Client, commit_n: u32, specs: Vec<DesiredSpec>) -> Result<u64, ClientError> {
    c.publish(&PublishRequest {
        commit: commit(commit_n),
        specs,
        signature: None,
    })
    .map(|r| r.generation)
}

#[test]
fn a_huge_publication_is_refused_and_the_master_lives_on() {
    let env = Env::new();
    let mut m = MasterProcess::start(env.dir.path(), &[]).unwrap();
    let p = m.publisher();
    let e = publish_specs(&p, 1, vec![service("web", 1, u32::MAX)]).unwrap_err();
    assert_eq!(
        e.status(),
        Some(400),
        "{e} (master process: {:?})",
        m.exited()
    );
    let text = e.to_string();
    assert!(
        text.contains("4294967295") && text.contains("at most 1000"),
        "{text}"
    );
    // Every spec within its bound, the publication above the total.
    let many: Vec<_> = (0..101)
        .map(|i| service(&format!("s{i}"), i, 1000))
        .collect();
    let e = publish_specs(&p, 2, many).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("101000 instances"), "{e}");
    assert_eq!(m.exited(), None);
    p.healthz().unwrap();
    assert!(
        p.generations().unwrap().is_empty(),
        "a refused publication was stored"
    );
    assert_eq!(publish_specs(&p, 3, vec![service("web", 1, 3)]).unwrap(), 1);

    // A restart finds the one valid generation.
    drop(m);
    let m = MasterProcess::start(env.dir.path(), &[]).unwrap();
    let p = m.publisher();
    let gens = p.generations().unwrap();
    assert_eq!(gens.len(), 1);
    assert_eq!(p.status().unwrap().desired_instances, 3);
}

/// What an older master, which bounded nothing, could have stored and made active.
fn store_as_an_older_master(db: &Path, commit_n: u32, specs: &[DesiredSpec]) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute(
        "INSERT INTO generations
           (commit_id, intent_hash, specs_json, spec_count, signature, published_at, publisher)
         VALUES (?1, ?2, ?3, ?4, NULL, 1, 'older master')",
        rusqlite::params![
            commit(commit_n),
            desired::intent_hash(&commit(commit_n), specs),
            desired::canonical_specs_json(specs),
            specs.len() as i64
        ],
    )
    .unwrap();
    let n = conn.last_insert_rowid();
    conn.execute("UPDATE active SET generation = ?1 WHERE id = 1", [n])
        .unwrap();
}

#[test]
fn a_stored_generation_that_cannot_be_scheduled_does_not_stop_the_master() {
    let env = Env::new();
    let m = MasterProcess::start(env.dir.path(), &[]).unwrap();
    let p = m.publisher();
    publish_specs(&p, 1, vec![service("web", 1, 1)]).unwrap();
    let token = client_at(&m.url, ENROLLER, "enroll.token")
        .enroll(&EnrollRequest {
            worker_id: "w1".into(),
            labels: Default::default(),
            capacity: udos_core::desired::Resources {
                cpu_millis: 4000,
                memory_mib: 4096,
            },
        })
        .unwrap()
        .token;
    drop(m);
    store_as_an_older_master(&env.path("master.db"), 2, &[service("web", 2, u32::MAX)]);

    let mut m = MasterProcess::start(env.dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let p = m.publisher();
    p.healthz().unwrap();
    let st = p.status().unwrap();
    assert_eq!(st.generation, 2);
    let problem = st.problem.clone().expect("no problem reported");
    assert!(
        problem.contains("generation 2 cannot be scheduled") && problem.contains("4294967295"),
        "{problem}"
    );
    assert_eq!(st.drift.first(), Some(&problem));
    // Workers are told to wait (they keep their last assignment), not given nothing.
    let w = client_at(&m.url, &token, "w1.token");
    let e = w.assignment("w1", 1, None).unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(p.metrics().unwrap().contains("udos_generation 2\n"));

    // Publishing a valid state repairs it.
    assert_eq!(publish_specs(&p, 3, vec![service("web", 3, 2)]).unwrap(), 3);
    let st = p.status().unwrap();
    assert_eq!(st.problem, None);
    let a = w.assignment("w1", 0, None).unwrap();
    assert_eq!((a.generation, a.assignments.len()), (3, 2));
    assert_eq!(m.exited(), None);
}

#[test]
fn idle_connections_cannot_starve_the_master() {
    let env = Env::new();
    // 128 descriptors: the master serves at most 64 connections (the rest of its
    // descriptors are its own), and closes idle ones after half a second.
    let vars = [
        ("UDOS_TEST_RLIMIT_NOFILE", "128".to_string()),
        ("UDOS_TEST_HEADER_TIMEOUT_MS", "500".to_string()),
    ];
    let mut m = MasterProcess::start(env.dir.path(), &vars).unwrap();
    let addr: SocketAddr = m.url.trim_start_matches("http://").parse().unwrap();
    let mut idle: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // A real request gets through: the idle connections ahead of it are closed in turn.
    let st = m.publisher().status();
    assert!(st.is_ok(), "{st:?} (master process: {:?})", m.exited());
    for (i, s) in idle.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        let closed = match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        assert!(closed, "idle connection {i} was not closed");
    }
    assert_eq!(m.exited(), None);
}
