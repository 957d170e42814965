//! Helpers shared by the integration tests: token files in a tempdir, a master on
//! 127.0.0.1:0, clients with each role, a worker that converges.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;
use udos_core::desired::{DesiredSpec, Resources, SpecKind};
use udos_core::wire::{
    AssignmentResponse, EnrollRequest, Heartbeat, InstanceState, PublishRequest, PublishResponse,
    RunningInstance,
};
use udos_master::{spawn, BackgroundServer, Client, ServeConfig};

pub const PUBLISHER: &str = "publisher-secret-0123456789";
pub const ENROLLER: &str = "enroll-secret-0123456789";

pub struct Env {
    pub dir: TempDir,
    pub config: ServeConfig,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("publisher.token");
        let e = dir.path().join("enroll.token");
        std::fs::write(&p, format!("{PUBLISHER}\n")).unwrap();
        std::fs::write(&e, format!("{ENROLLER}\n")).unwrap();
        let config = ServeConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("master.db"),
            p,
            e,
        );
        Self { dir, config }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn start(&self) -> BackgroundServer {
        spawn(self.config.clone(), 2).unwrap()
    }
}

pub fn client(server: &BackgroundServer, token: &str, origin: &str) -> Client {
    client_at(&server.url(), token, origin)
}

pub fn client_at(url: &str, token: &str, origin: &str) -> Client {
    Client::new(url, None)
        .unwrap()
        .with_token(token, origin)
        .with_timeout(Duration::from_secs(20))
}

pub fn publisher(server: &BackgroundServer) -> Client {
    client(server, PUBLISHER, "publisher.token").with_publisher_name("ci-test")
}

pub fn enroller(server: &BackgroundServer) -> Client {
    client(server, ENROLLER, "enroll.token")
}

pub fn commit(n: u32) -> String {
    format!("{n:040x}")
}

pub fn hash(n: u32) -> String {
    format!("{n:032x}")
}

pub fn service(id: &str, h: u32, replicas: u32) -> DesiredSpec {
    DesiredSpec {
        id: id.into(),
        hash: hash(h),
        kind: SpecKind::Service {
            image: "sha256-img".into(),
            replicas,
        },
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        resources: Resources {
            cpu_millis: 100,
            memory_mib: 64,
        },
    }
}

pub fn run(id: &str, h: u32) -> DesiredSpec {
    DesiredSpec {
        id: id.into(),
        hash: hash(h),
        kind: SpecKind::WorkflowRun {
            workflow: ".github/workflows/ci.yml".into(),
            job: None,
            repository: None,
        },
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        resources: Resources {
            cpu_millis: 100,
            memory_mib: 64,
        },
    }
}

pub fn publish(c: &Client, commit_n: u32, specs: Vec<DesiredSpec>) -> PublishResponse {
    c.publish(&PublishRequest {
        commit: commit(commit_n),
        specs,
        signature: None,
    })
    .unwrap()
}

pub struct Worker {
    pub id: String,
    pub client: Client,
    pub token: String,
}

pub fn enroll(server: &BackgroundServer, id: &str, labels: &[(&str, &str)]) -> Worker {
    let resp = enroller(server)
        .enroll(&EnrollRequest {
            worker_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: Resources {
                cpu_millis: 100_000,
                memory_mib: 100_000,
            },
        })
        .unwrap();
    Worker {
        id: id.into(),
        client: client(server, &resp.token, &format!("{id}.token")),
        token: resp.token,
    }
}

impl Worker {
    pub fn poll(&self, seen: u64) -> AssignmentResponse {
        self.client.assignment(&self.id, seen, None).unwrap()
    }

    /// Report exactly what `a` assigns: services running, workflow runs finished well.
    pub fn report(&self, a: &AssignmentResponse) {
        self.client
            .heartbeat(&Heartbeat {
                worker_id: self.id.clone(),
                seen_generation: a.generation,
                instances: a
                    .assignments
                    .iter()
                    .map(|x| RunningInstance {
                        spec: x.spec.id.clone(),
                        replica: x.replica,
                        hash: x.spec.hash.clone(),
                        state: match x.spec.kind {
                            SpecKind::WorkflowRun { .. } => InstanceState::Succeeded,
                            SpecKind::Service { .. } => InstanceState::Running,
                        },
                        uptime_s: 1,
                        snapshot_ids: vec![],
                        message: None,
                        commit: None,
                    })
                    .collect(),
                used: Resources::default(),
            })
            .unwrap();
    }

    /// Poll, then report the assignment as running.
    pub fn converge(&self) -> AssignmentResponse {
        let a = self.poll(0);
        self.report(&a);
        a
    }
}

/// A raw HTTP call (for bodies the typed client cannot produce): (status, body).
pub fn raw(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut req = ureq::request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        Err(e) => panic!("transport error: {e}"),
    }
}
