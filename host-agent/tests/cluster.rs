//! The cluster end to end, with real processes on loopback: one `udos master serve`
//! (a real SQLite file), `udos agent` workers that run real VMs (QEMU; TCG on
//! machines without a usable KVM), and the CLI (`udos publish`, `udos status`,
//! `udos diff-generations`). Covers the "done when" list of docs/master-api.md.
//!
//! Needs what host-agent/tests/e2e.rs needs: a static udos-init (`UDOS_INIT`, set by
//! scripts/test) and the host tools. The image is built once into the state dir the
//! e2e tests share (`$UDOS_TEST_STATE`, default under the cargo target dir); every
//! worker gets its own state dir whose `images/` points there. Every process a test
//! starts is killed when the test ends (a drop guard), and every wait is bounded.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{git, GitDaemon};

/// Convergence involves booting VMs under TCG on a 2-core machine.
const CONVERGE: Duration = Duration::from_secs(240);
const LEASE_S: u64 = 5;

fn udos_bin() -> &'static str {
    env!("CARGO_BIN_EXE_udos")
}

fn shared_state() -> PathBuf {
    std::env::var_os("UDOS_TEST_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("udos-e2e-state"))
}

/// One cluster test at a time (VMs are heavy), and the image is built once; returns
/// the image id services name.
fn serial() -> (MutexGuard<'static, ()>, String) {
    static LOCK: Mutex<()> = Mutex::new(());
    static IMAGE: OnceLock<String> = OnceLock::new();
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let id = IMAGE.get_or_init(|| {
        let out = Command::new(udos_bin())
            .arg("--state-dir")
            .arg(shared_state())
            .args(["image", "build", "--json"])
            .output()
            .expect("spawn udos image build");
        assert!(
            out.status.success(),
            "udos image build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["image_id"].as_str().unwrap().to_string()
    });
    (guard, id.clone())
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test started and has not reaped yet.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A child process, killed when dropped.
struct Proc {
    name: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(name: &str, logs: &Path, args: &[String]) -> Proc {
        let out = logs.join(format!("{name}.out"));
        let err = logs.join(format!("{name}.err"));
        let child = Command::new(udos_bin())
            .args(args)
            .env("UDOS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&err)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn udos");
        Proc {
            name: name.to_string(),
            child,
            out,
            err,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after 15 s.
    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM: SIGKILL", self.name);
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
            return v;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

const PUBLISHER: &str = "publisher-token-for-the-cluster-test";
const ENROLLER: &str = "enroll-token-for-the-cluster-test";

fn commit(n: u32) -> String {
    format!("{n:040x}")
}

fn service(id: &str, hash: u32, image: &str, replicas: u32, selector: Value) -> Value {
    json!({
        "id": id, "hash": format!("{hash:032x}"), "kind": "service", "image": image,
        "replicas": replicas, "selector": selector,
        "resources": {"cpu_millis": 250, "memory_mib": 256},
    })
}

struct Cluster {
    dir: tempfile::TempDir,
    listen: String,
    url: String,
    master_args: Vec<String>,
    master: Option<Proc>,
    agents: BTreeMap<String, Proc>,
    started: Instant,
}

impl Cluster {
    /// A master on a free loopback port with a short lease.
    fn new(master_extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("publisher.token"), PUBLISHER).unwrap();
        std::fs::write(dir.path().join("enroll.token"), ENROLLER).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let mut c = Cluster {
            listen: "127.0.0.1:0".into(),
            url: String::new(),
            master_args: master_extra.iter().map(|s| s.to_string()).collect(),
            master: None,
            agents: BTreeMap::new(),
            started: Instant::now(),
            dir,
        };
        c.start_master();
        // Restarts reuse the port.
        c.listen = c.url.trim_start_matches("http://").to_string();
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_master(&mut self) {
        let p = |s: &str| self.path(s).display().to_string();
        let mut args = vec![
            "--state-dir".into(),
            p("master-state"),
            "master".into(),
            "serve".into(),
            "--listen".into(),
            self.listen.clone(),
            "--db".into(),
            p("master.db"),
            "--publisher-token-file".into(),
            p("publisher.token"),
            "--enroll-token-file".into(),
            p("enroll.token"),
            "--lease".into(),
            LEASE_S.to_string(),
        ];
        args.extend(self.master_args.iter().cloned());
        let proc = Proc::spawn("master", &self.path("logs"), &args);
        let out = proc.out.clone();
        let url = wait_for("the master listens", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            text.lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|u| u.trim().to_string())
        });
        self.url = url;
        self.master = Some(proc);
    }

    fn stop_master(&mut self) {
        if let Some(mut m) = self.master.take() {
            m.terminate();
        }
    }

    /// A worker with its own state dir (sharing the built image).
    fn agent(&mut self, id: &str, labels: &str, extra: &[&str]) {
        let state = self.path(id);
        std::fs::create_dir_all(&state).unwrap();
        let images = state.join("images");
        if !images.exists() {
            std::os::unix::fs::symlink(shared_state().join("images"), &images).unwrap();
        }
        let probe = shared_state().join("kvm-probe.json");
        if probe.is_file() && !state.join("kvm-probe.json").exists() {
            std::fs::copy(&probe, state.join("kvm-probe.json")).unwrap();
        }
        let mut args: Vec<String> = vec![
            "--state-dir".into(),
            state.display().to_string(),
            "agent".into(),
            "--master".into(),
            self.url.clone(),
            "--worker-id".into(),
            id.into(),
            "--labels".into(),
            labels.into(),
            "--capacity-cpu".into(),
            "1000".into(),
            "--capacity-memory".into(),
            "1024".into(),
            "--poll".into(),
            "10".into(),
            "--retry".into(),
            "1".into(),
            "--heartbeat".into(),
            "2".into(),
            "--hypervisor".into(),
            "qemu".into(),
        ];
        if !extra.contains(&"--enroll-token-file") {
            args.push("--enroll-token-file".into());
            args.push(self.path("enroll.token").display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(id, &self.path("logs"), &args);
        self.agents.insert(id.to_string(), proc);
    }

    /// `udos ARGS --master URL --token-file publisher.token`.
    fn udos(&self, args: &[&str]) -> Output {
        self.udos_with_token(args, &self.path("publisher.token"))
    }

    fn udos_with_token(&self, args: &[&str], token: &Path) -> Output {
        let out = Command::new(udos_bin())
            .arg("--state-dir")
            .arg(self.path("cli-state"))
            .args(args)
            .arg("--master")
            .arg(&self.url)
            .arg("--token-file")
            .arg(token)
            .output()
            .expect("spawn udos");
        eprintln!(
            "[{:>6.1}s] $ udos {} -> {:?}\n{}",
            self.started.elapsed().as_secs_f64(),
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        out
    }

    fn publish(&self, commit: &str, specs: &Value, extra: &[&str]) -> Output {
        let file = self.path(&format!("specs-{commit}-{}.json", rand_suffix()));
        std::fs::write(&file, serde_json::to_vec(specs).unwrap()).unwrap();
        let f = file.display().to_string();
        let mut args = vec!["publish", "--json", "--commit", commit];
        args.extend_from_slice(extra);
        args.push(&f);
        self.udos(&args)
    }

    fn status(&self) -> Option<Value> {
        let out = self.udos_quiet(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn udos_quiet(&self, args: &[&str]) -> Output {
        Command::new(udos_bin())
            .arg("--state-dir")
            .arg(self.path("cli-state"))
            .args(args)
            .arg("--master")
            .arg(&self.url)
            .arg("--token-file")
            .arg(self.path("publisher.token"))
            .output()
            .expect("spawn udos")
    }

    /// Status once generation `g` is fully converged.
    fn converged(&self, g: u64) -> Value {
        wait_for(&format!("generation {g} converged"), CONVERGE, || {
            self.status().filter(|s| {
                s["generation"] == g
                    && s["convergence"].as_f64() == Some(1.0)
                    && s["desired_instances"].as_u64() > Some(0)
            })
        })
    }

    /// `spec.replica` → hypervisor pid, over every worker's running VMs.
    fn vm_pids(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for id in self.agents.keys() {
            let vms = self.path(id).join("agent/vms");
            for e in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(text) = std::fs::read_to_string(e.path().join("hypervisor.pid")) else {
                    continue;
                };
                let Ok(pid) = text.trim().parse::<u32>() else {
                    continue;
                };
                // <spec>.<replica>.<seq>
                let key = name.rsplit_once('.').map(|(k, _)| k).unwrap_or(&name);
                out.insert(format!("{key}@{id}"), pid);
            }
        }
        out
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut a) in std::mem::take(&mut self.agents) {
            a.terminate();
        }
        self.stop_master();
        if std::thread::panicking() {
            for e in std::fs::read_dir(self.path("logs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!("--- {} ---\n{}", e.path().display(), tail.join("\n"));
            }
        }
    }
}

fn json_out(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// (worker, spec, replica) → (hash, state, uptime) from a status report.
fn reported(s: &Value) -> BTreeMap<(String, String, u64), (String, String, u64)> {
    let mut out = BTreeMap::new();
    for w in s["workers"].as_array().unwrap() {
        for i in w["instances"].as_array().unwrap() {
            out.insert(
                (
                    w["id"].as_str().unwrap().to_string(),
                    i["spec"].as_str().unwrap().to_string(),
                    i["replica"].as_u64().unwrap(),
                ),
                (
                    i["hash"].as_str().unwrap().to_string(),
                    i["state"].as_str().unwrap().to_string(),
                    i["uptime_s"].as_u64().unwrap(),
                ),
            );
        }
    }
    out
}

fn last_heartbeats(s: &Value) -> BTreeMap<String, String> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["id"].as_str().unwrap().to_string(),
                w["last_heartbeat_at"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn publish_converge_master_restart_new_generation_rejection_and_rollback() {
    let (_g, image) = serial();
    let mut c = Cluster::new(&[]);
    c.agent("w1", "zone=a", &[]);
    c.agent("w2", "zone=b", &[]);
    c.agent("w3", "zone=c", &[]);
    let gen1 = json!({ "specs": [
        service("web", 1, &image, 2, json!({})),
        service("db", 0xd1, &image, 1, json!({"zone": "c"})),
    ]});
    let out = c.publish(&commit(0xa), &gen1, &[]);
    assert!(out.status.success());
    let p = json_out(&out);
    assert_eq!(p["generation"], 1);
    assert_eq!(p["created"], true);

    // 1. Every agent converges; `udos status` says 100%.
    let s = c.converged(1);
    assert_eq!(s["desired_instances"], 3);
    let db = &s["specs"].as_array().unwrap()[0];
    assert_eq!(db["id"], "db");
    assert_eq!(db["instances"][0]["worker"], "w3", "the selector holds");
    let text = c.udos(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("convergence 100.0% (3/3 instances)"),
        "{text}"
    );
    let pids = c.vm_pids();
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(pids.values().all(|p| alive(*p)));

    // 2. The master goes away: the workers keep running.
    let before = reported(&s);
    let hb_before = last_heartbeats(&s);
    c.stop_master();
    let down_at = Instant::now();
    std::thread::sleep(Duration::from_secs(2 * LEASE_S));
    assert_eq!(c.udos(&["status"]).status.code(), Some(1), "no master");
    assert_eq!(
        c.vm_pids(),
        pids,
        "VMs were touched while the master was down"
    );
    assert!(pids.values().all(|p| alive(*p)));

    // 3. It comes back: the state reloads, nothing is re-created.
    c.start_master();
    let s = wait_for("every worker reports to the new master", CONVERGE, || {
        c.status().filter(|s| {
            let hb = last_heartbeats(s);
            s["convergence"].as_f64() == Some(1.0)
                && hb
                    .iter()
                    .all(|(w, at)| hb_before.get(w).is_some_and(|b| at > b))
        })
    });
    assert_eq!(s["generation"], 1, "the active generation reloaded");
    assert_eq!(c.vm_pids(), pids, "VMs re-created after a master restart");
    let gap = down_at.elapsed().as_secs();
    for (k, (hash, state, up)) in reported(&s) {
        let (h0, _, up0) = &before[&k];
        assert_eq!(&hash, h0);
        assert_eq!(state, "running");
        assert!(
            up + 5 >= up0 + gap,
            "{k:?} restarted: uptime {up0} then {up} ({gap}s later)"
        );
    }

    // 4. A new generation after the restart: web changes, db stays.
    let gen2 = json!([
        service("web", 2, &image, 2, json!({})),
        service("db", 0xd1, &image, 1, json!({"zone": "c"})),
    ]);
    let out = c.publish(&commit(0xb), &gen2, &[]);
    assert_eq!(json_out(&out)["generation"], 2);
    c.converged(2);
    let pids2 = c.vm_pids();
    let db_pid = |p: &BTreeMap<String, u32>| p.get("db.0@w3").copied();
    assert_eq!(db_pid(&pids2), db_pid(&pids), "db was not touched");
    for (k, pid) in &pids2 {
        if k.starts_with("web.") {
            assert!(!pids.values().any(|p| p == pid), "web {k} was not replaced");
        }
    }
    let d = json_out(&c.udos(&["diff-generations", "1", "2", "--json"]));
    assert_eq!(d["changed"][0]["id"], "web");
    assert_eq!(d["unchanged"], 1);

    // 5. A rejected publication changes nothing.
    let dup = json!([
        service("web", 3, &image, 1, json!({})),
        service("web", 4, &image, 1, json!({})),
    ]);
    let out = c.publish(&commit(0xc), &dup, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than once"));
    let out = c.publish("not-a-commit", &gen2, &[]);
    assert_eq!(out.status.code(), Some(1));
    let s = c.status().unwrap();
    assert_eq!(s["generation"], 2);
    assert_eq!(s["convergence"].as_f64(), Some(1.0));

    // 6. Rollback: publishing the first state again makes generation 1 active.
    let out = c.publish(&commit(0xa), &gen1, &[]);
    let p = json_out(&out);
    assert_eq!(p["generation"], 1);
    assert_eq!(p["created"], false);
    let s = c.converged(1);
    let web = s["specs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "web")
        .unwrap();
    assert_eq!(web["hash"], format!("{:032x}", 1));
    let pids3 = c.vm_pids();
    assert_eq!(db_pid(&pids3), db_pid(&pids));
    eprintln!("done in {:?}", c.started.elapsed());
}

#[test]
fn a_dead_workers_instances_move_after_its_lease() {
    let (_g, image) = serial();
    let mut c = Cluster::new(&[]);
    for w in ["w1", "w2", "w3"] {
        c.agent(w, "", &[]);
    }
    let out = c.publish(
        &commit(0x1),
        &json!([service("web", 7, &image, 2, json!({}))]),
        &[],
    );
    assert!(out.status.success());
    let s = c.converged(1);
    let placed = |s: &Value| -> Vec<String> {
        s["specs"][0]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["worker"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let before = placed(&s);
    let victim = before[0].clone();
    let survivor = before[1].clone();
    let pids = c.vm_pids();
    let victim_pid = pids[&format!("web.0@{victim}")];
    let survivor_pid = pids[&format!("web.1@{survivor}")];

    // SIGKILL: no goodbye. Its VM dies with it.
    let mut dead = c.agents.remove(&victim).unwrap();
    dead.kill();
    wait_for("the victim's VM is gone", Duration::from_secs(10), || {
        (!alive(victim_pid)).then_some(())
    });
    let s = wait_for("web@0 moved and converged", CONVERGE, || {
        c.status().filter(|s| {
            let w = placed(s);
            s["convergence"].as_f64() == Some(1.0) && !w.contains(&victim)
        })
    });
    let victim_status = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == victim.as_str())
        .unwrap();
    assert_eq!(victim_status["live"], false);
    assert!(s["drift"].as_array().unwrap().iter().any(|d| d
        .as_str()
        .unwrap()
        .contains(&format!("worker {victim} last seen"))));
    assert_eq!(placed(&s)[1], survivor, "web@1 stayed where it was");
    assert!(alive(survivor_pid), "web@1 was not restarted");
    assert_eq!(c.vm_pids()[&format!("web.1@{survivor}")], survivor_pid);
}

/// A raw HTTP request without any token.
fn http_get(url: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn unauthenticated_and_wrongly_signed_requests_are_refused() {
    let (_g, image) = serial();
    let seed = "5e".repeat(32);
    let other = "6f".repeat(32);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("intent.key");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&key, &seed).unwrap();
    std::fs::write(&wrong, &other).unwrap();
    let sk = udos_master::signing::parse_signing_key(&seed).unwrap();
    let pubkey = dir.path().join("intent.pub");
    std::fs::write(&pubkey, udos_master::signing::public_hex(&sk)).unwrap();
    let (key, wrong, pubkey) = (
        key.display().to_string(),
        wrong.display().to_string(),
        pubkey.display().to_string(),
    );

    // A master that only takes signed intent.
    let mut c = Cluster::new(&["--intent-pubkey", &pubkey]);
    assert!(http_get(&c.url, "/v1/status").starts_with("HTTP/1.1 401"));
    assert!(http_get(&c.url, "/healthz").contains("ok"));
    let out = c.udos_with_token(&["status"], &c.path("enroll.token"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not call"));
    std::fs::write(c.path("bogus.token"), "bogus").unwrap();
    let out = c.udos_with_token(&["status"], &c.path("bogus.token"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token"));

    let specs = json!([]);
    let out = c.publish(&commit(1), &specs, &[]);
    assert_eq!(out.status.code(), Some(1), "unsigned publication accepted");
    let out = c.publish(&commit(1), &specs, &["--signing-key", &wrong]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "wrongly signed publication accepted"
    );
    assert_eq!(c.status().unwrap()["generation"], 0);
    let out = c.publish(&commit(1), &specs, &["--signing-key", &key]);
    assert!(out.status.success());
    assert_eq!(json_out(&out)["generation"], 1);

    // A worker with a wrong enrollment token is refused.
    std::fs::write(c.path("bad-enroll.token"), "not-the-enrollment-token").unwrap();
    let bad = c.path("bad-enroll.token").display().to_string();
    c.agent("intruder", "", &["--enroll-token-file", &bad]);
    let mut intruder = c.agents.remove("intruder").unwrap();
    let code = wait_for("the intruder exits", Duration::from_secs(60), || {
        intruder.child.try_wait().unwrap().map(|s| s.code())
    });
    assert_eq!(code, Some(1), "{}", intruder.stderr());
    assert!(
        intruder.stderr().contains("refused the token"),
        "{}",
        intruder.stderr()
    );
    drop(intruder);
    c.stop_master();

    // A master that does not check signatures (think: compromised) cannot make a
    // worker that checks them run anything unsigned.
    let mut c = Cluster::new(&[]);
    c.agent("w1", "", &["--intent-pubkey", &pubkey]);
    let out = c.publish(&commit(1), &json!([]), &["--signing-key", &key]);
    assert!(out.status.success());
    wait_for(
        "w1 applies signed generation 1",
        Duration::from_secs(60),
        || {
            c.status()
                .filter(|s| s["workers"][0]["seen_generation"] == 1)
        },
    );
    let forged = json!([service("web", 9, &image, 1, json!({}))]);
    for (n, extra) in [(2, vec![]), (3, vec!["--signing-key", wrong.as_str()])] {
        let out = c.publish(&commit(n), &forged, &extra);
        assert!(out.status.success(), "this master takes anything");
    }
    std::thread::sleep(Duration::from_secs(5));
    let s = c.status().unwrap();
    assert_eq!(s["generation"], 3);
    assert_eq!(s["workers"][0]["seen_generation"], 1, "{s:#}");
    assert!(s["workers"][0]["instances"].as_array().unwrap().is_empty());
    assert!(c.vm_pids().is_empty(), "a VM was started for forged intent");
    let log = c.agents["w1"].stderr();
    assert!(
        log.contains("refusing the assignment of generation 2"),
        "{log}"
    );
    assert!(log.contains("is not signed"), "{log}");
    assert!(
        log.contains("refusing the assignment of generation 3"),
        "{log}"
    );
    // Signed again: applied.
    let out = c.publish(&commit(4), &json!([]), &["--signing-key", &key]);
    assert_eq!(json_out(&out)["generation"], 4);
    wait_for(
        "w1 applies signed generation 4",
        Duration::from_secs(60),
        || {
            c.status()
                .filter(|s| s["workers"][0]["seen_generation"] == 4)
        },
    );
}

const SLOW: &str = r#"
on: push
jobs:
  slow:
    runs-on: ubuntu-latest
    steps:
      - run: sleep 600
      - run: echo never
"#;

const WORKFLOW: &str = r#"
name: ci
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: build
        run: |
          mkdir -p out
          echo built > out/artifact.txt
      - name: test
        run: grep -q built out/artifact.txt
      - name: network
        run: |
          grep -q nameserver /etc/resolv.conf
          ls /sys/class/net | grep -qv '^lo$'
"#;

#[test]
fn a_workflow_run_spec_runs_in_vms_and_reports_its_snapshots() {
    let (_g, _image) = serial();
    let mut c = Cluster::new(&[]);
    // The working tree the workflow comes from.
    let repo = c.path("repo");
    std::fs::create_dir_all(repo.join(".github/workflows")).unwrap();
    std::fs::write(repo.join(".github/workflows/ci.yml"), WORKFLOW).unwrap();
    std::fs::write(repo.join(".github/workflows/slow.yml"), SLOW).unwrap();
    std::fs::write(repo.join("README"), "cluster test\n").unwrap();
    common::commit_all(&repo);
    // The agent fetches the published commit from its --workdir (no --repository).
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let repo_s = repo.display().to_string();
    c.agent("w1", "", &["--workdir", &repo_s]);
    let spec = json!([{
        "id": "ci", "hash": format!("{:032x}", 0xc1), "kind": "workflow_run",
        "workflow": ".github/workflows/ci.yml", "job": "build",
        "resources": {"cpu_millis": 1000, "memory_mib": 512},
    }]);
    assert!(c.publish(&head, &spec, &[]).status.success());
    // (The master counts a workflow run in progress as converged: wait for its end.)
    let s = wait_for("the workflow run succeeded", CONVERGE, || {
        c.status().filter(|s| {
            let i = &s["workers"][0]["instances"][0];
            s["convergence"].as_f64() == Some(1.0)
                && matches!(i["state"].as_str(), Some("succeeded" | "failed"))
        })
    });
    let inst = &s["workers"][0]["instances"][0];
    assert_eq!(inst["state"], "succeeded", "{s:#}");
    assert_eq!(inst["commit"], head.as_str(), "{s:#}");
    let snaps: Vec<String> = inst["snapshot_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // The third step succeeded only with a NIC and a resolver: the run had a network.
    assert_eq!(snaps.len(), 3, "one restore point per step: {inst:#}");
    assert!(snaps.iter().all(|id| id.len() == 64));
    let text = String::from_utf8_lossy(&c.udos(&["status"]).stdout).into_owned();
    assert!(
        text.contains("snapshots:") && text.contains(&snaps[0][..12]),
        "{text}"
    );
    // They are snapshots in the worker's restic repository.
    let w1 = c.path("w1");
    let out = Command::new("restic")
        .args(["snapshots", "--json"])
        .env("RESTIC_REPOSITORY", w1.join("restic"))
        .env("RESTIC_PASSWORD_FILE", w1.join("restic-password"))
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(snaps.iter().all(|s| ids.contains(&s.as_str())));

    // A restarted agent remembers the finished run and does not run it again.
    let mut a = c.agents.remove("w1").unwrap();
    a.terminate();
    drop(a);
    let hb = last_heartbeats(&c.status().unwrap());
    c.agent("w1", "", &["--workdir", &repo_s]);
    let s = wait_for("the restarted agent reports", CONVERGE, || {
        c.status().filter(|s| {
            last_heartbeats(s)["w1"] > hb["w1"] && s["convergence"].as_f64() == Some(1.0)
        })
    });
    assert_eq!(s["workers"][0]["instances"][0]["snapshot_ids"][0], snaps[0]);
    let runs = Command::new(udos_bin())
        .arg("--state-dir")
        .arg(&w1)
        .args(["runs", "--json"])
        .output()
        .unwrap();
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
    assert_eq!(
        runs.as_array().unwrap().len(),
        1,
        "the run ran again: {runs:#}"
    );

    // A run that is no longer wanted is cancelled: its step VM is killed and the
    // remaining steps never start.
    let slow = json!([{
        "id": "slow", "hash": format!("{:032x}", 0x51), "kind": "workflow_run",
        "workflow": ".github/workflows/slow.yml",
        "resources": {"cpu_millis": 1000, "memory_mib": 512},
    }]);
    assert!(c.publish(&head, &slow, &[]).status.success());
    let runs_dir = w1.join("runs");
    wait_for("the slow run's step VM runs", CONVERGE, || {
        let pid_files: Vec<PathBuf> = std::fs::read_dir(&runs_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join("leg-0/step-1/vm/hypervisor.pid"))
            .filter(|p| p.is_file())
            .collect();
        (!pid_files.is_empty()).then_some(())
    });
    let cancelled_at = Instant::now();
    assert!(c.publish(&commit(0x52), &json!([]), &[]).status.success());
    wait_for("the slow run is gone", Duration::from_secs(60), || {
        c.status().filter(|s| {
            s["generation"] == 3
                && s["workers"][0]["instances"]
                    .as_array()
                    .is_some_and(|a| a.is_empty())
        })
    });
    assert!(cancelled_at.elapsed() < Duration::from_secs(60));
    let runs = Command::new(udos_bin())
        .arg("--state-dir")
        .arg(&w1)
        .args(["runs", "--json"])
        .output()
        .unwrap();
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
    let last = runs
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|r| r["run_id"].as_i64())
        .unwrap()
        .clone();
    assert_eq!(last["status"], "cancelled", "{runs:#}");
    let layers = Command::new(udos_bin())
        .arg("--state-dir")
        .arg(&w1)
        .args(["layers", &last["run_id"].to_string(), "--json"])
        .output()
        .unwrap();
    let layers: Value = serde_json::from_slice(&layers.stdout).unwrap();
    let steps = layers["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{layers:#}");
    assert_eq!(
        steps[1]["status"], "skipped",
        "the second step never started"
    );
}

/// The workflow of commit `which`: its one step records the commit's `message.txt`,
/// which workflow ran, and the `github.sha` the run was given.
fn recording_workflow(which: &str) -> String {
    format!(
        r#"
name: ci
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: record {which}
        run: |
          cat message.txt > recorded.txt
          echo "workflow {which} at $GITHUB_SHA" >> recorded.txt
"#
    )
}

/// `udos --state-dir STATE ARGS`, which must succeed; its stdout.
fn udos_at(state: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(udos_bin())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("spawn udos");
    assert!(
        out.status.success(),
        "udos {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The instance of `spec` the first worker reports, once it has finished at `commit`.
fn finished_at(c: &Cluster, spec: &str, commit: &str) -> Value {
    wait_for(
        &format!("{spec} finished at {}", &commit[..12]),
        CONVERGE,
        || {
            let s = c.status()?;
            let i = s["workers"][0]["instances"]
                .as_array()?
                .iter()
                .find(|i| i["spec"] == spec)?
                .clone();
            let done = matches!(i["state"].as_str(), Some("succeeded" | "failed"));
            (done && i["commit"] == commit).then_some(i)
        },
    )
}

/// What the run named in a finished instance's message (`run N`) recorded: the
/// worker's `recorded.txt` as step 1 left it, restored from its snapshots.
fn recorded_by(c: &Cluster, worker: &str, inst: &Value) -> String {
    let msg = inst["message"].as_str().unwrap_or_default();
    let run = msg
        .strip_prefix("run ")
        .unwrap_or_else(|| panic!("no run in {inst:#}"));
    let target = c.path(&format!("restored-{worker}-{run}"));
    let t = target.display().to_string();
    udos_at(&c.path(worker), &["restore", run, "1", "--target", &t]);
    std::fs::read_to_string(target.join("workspace/recorded.txt")).unwrap()
}

#[test]
fn the_published_commit_is_what_runs() {
    let (_g, _image) = serial();
    let mut c = Cluster::new(&[]);
    // Two commits whose workflow and files differ, served by a real git server:
    // `repo.git` has A and B, `mirror.git` only A.
    let src = c.path("src");
    std::fs::create_dir_all(src.join(".github/workflows")).unwrap();
    let commit_as = |which: &str| {
        std::fs::write(
            src.join(".github/workflows/ci.yml"),
            recording_workflow(which),
        )
        .unwrap();
        std::fs::write(src.join("message.txt"), format!("from commit {which}\n")).unwrap();
        if !src.join(".git").exists() {
            git(&src, &["init", "-q", "."]);
        }
        git(&src, &["add", "-A"]);
        git(&src, &["commit", "-q", "-m", which]);
        git(&src, &["rev-parse", "HEAD"])
    };
    let a = commit_as("A");
    let b = commit_as("B");
    let served = c.path("served");
    std::fs::create_dir_all(&served).unwrap();
    let src_s = src.display().to_string();
    git(&served, &["clone", "-q", "--bare", &src_s, "repo.git"]);
    git(&served, &["init", "-q", "--bare", "mirror.git"]);
    let mirror_dir = served.join("mirror.git").display().to_string();
    git(
        &src,
        &["push", "-q", &mirror_dir, &format!("{a}:refs/heads/main")],
    );
    let daemon = GitDaemon::start(&served);
    let (repo, mirror) = (daemon.url("repo.git"), daemon.url("mirror.git"));
    // The agent's own working tree is at neither commit's content: what runs must
    // never come from it. Specs without a `repository` use its --repository.
    std::fs::write(src.join("message.txt"), "from the agent's workdir\n").unwrap();
    c.agent("w1", "", &["--workdir", &src_s, "--repository", &mirror]);

    // One spec id and hash throughout (the publisher's hash need not cover the
    // commit): A from the agent's repository, B from the one the spec names.
    let spec = |repository: Option<&str>| {
        let mut s = json!({
            "id": "ci", "hash": format!("{:032x}", 0xc0),
            "kind": "workflow_run", "workflow": ".github/workflows/ci.yml",
            "resources": {"cpu_millis": 1000, "memory_mib": 512},
        });
        if let Some(r) = repository {
            s["repository"] = json!(r);
        }
        json!([s])
    };
    for (n, commit, which, specs) in [(1, &a, "A", spec(None)), (2, &b, "B", spec(Some(&repo)))] {
        let out = c.publish(commit, &specs, &[]);
        assert_eq!(json_out(&out)["generation"], n);
        let inst = finished_at(&c, "ci", commit);
        assert_eq!(inst["state"], "succeeded", "{inst:#}");
        assert_eq!(
            recorded_by(&c, "w1", &inst),
            format!("from commit {which}\nworkflow {which} at {commit}\n")
        );
        let s = c.converged(n);
        let st = &s["specs"][0]["instances"][0];
        assert_eq!(st["running_commit"], commit.as_str(), "{s:#}");
        let text = String::from_utf8_lossy(&c.udos(&["status"]).stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("ci "))
            .unwrap_or_else(|| panic!("no ci line in\n{text}"));
        assert!(line.contains(&commit[..12]), "{text}");
    }
    let runs = |c: &Cluster| -> usize {
        let v: Value =
            serde_json::from_slice(&udos_at(&c.path("w1"), &["runs", "--json"])).unwrap();
        v.as_array().unwrap().len()
    };
    assert_eq!(runs(&c), 2);
    let checkouts = c.path("w1").join("agent/checkouts");
    let left = |d: &Path| std::fs::read_dir(d).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left(&checkouts), 0, "every run's worktree is removed");

    // A commit the repository does not have: refused with a clear message, nothing runs.
    let missing = "c0ffee".repeat(7)[..40].to_string();
    let out = c.publish(&missing, &spec(None), &[]);
    assert_eq!(json_out(&out)["generation"], 3);
    let inst = finished_at(&c, "ci", &missing);
    assert_eq!(inst["state"], "failed", "{inst:#}");
    let msg = inst["message"].as_str().unwrap();
    eprintln!("the missing commit: {msg}");
    assert!(
        msg.contains("nothing ran")
            && msg.contains(&format!("cannot fetch commit {missing} from {mirror}")),
        "{msg}"
    );
    assert_eq!(
        runs(&c),
        2,
        "a run was started for a commit that does not exist"
    );
    assert_eq!(left(&checkouts), 0);
    let text = String::from_utf8_lossy(&c.udos(&["status"]).stdout).into_owned();
    assert!(text.contains("cannot fetch commit"), "{text}");
    drop(daemon);
}
