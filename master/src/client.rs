//! A small blocking client of the master's `/v1` API (ureq, rustls with ring).
//!
//! ```no_run
//! # fn main() -> Result<(), udos_master::client::ClientError> {
//! use udos_master::client::Client;
//! let c = Client::new("https://master:7400", Some("ca.pem".as_ref()))?
//!     .with_token_file("publisher.token".as_ref())?;
//! println!("{}", c.status()?.percent());
//! # Ok(()) }
//! ```
//! Errors say what to do: a refused token names the file it came from.

use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use udos_core::wire::{
    AssignmentResponse, EnrollRequest, EnrollResponse, Heartbeat, HeartbeatResponse,
    PublishRequest, PublishResponse, ReplaceWorkerRequest,
};

use crate::api::{
    AuditEntry, DiffResponse, ErrorBody, GenerationDetail, GenerationSummary, StatusReport,
};
use crate::token::read_token_file;

/// Default time limit of one request (a long poll adds its `wait`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed, phrased as what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad client setup (URL, CA file, token file).
    #[error("{0}")]
    Config(String),
    /// No token was configured for an endpoint that needs one.
    #[error("no token for {endpoint}: pass --token-file")]
    NoToken {
        /// The endpoint.
        endpoint: String,
    },
    /// Connection, DNS or TLS failure.
    #[error("cannot reach the master at {url}: {detail} (is it running? check --master, and --ca-cert for https)")]
    Unreachable {
        /// The URL called.
        url: String,
        /// What failed.
        detail: String,
    },
    /// 401.
    #[error(
        "the master refused the token from {origin} ({detail}): re-enroll or check --token-file"
    )]
    Unauthorized {
        /// Where the token came from.
        origin: String,
        /// The master's explanation.
        detail: String,
    },
    /// 403.
    #[error("the token from {origin} may not call {endpoint}: {detail} (publish/status/generations/diff/audit/workers need the publisher token, enroll the enrollment token or the worker's own, assignment/heartbeat a worker token)")]
    Forbidden {
        /// Where the token came from.
        origin: String,
        /// The endpoint.
        endpoint: String,
        /// The master's explanation.
        detail: String,
    },
    /// 400.
    #[error("the master refused the request: {0}")]
    Rejected(String),
    /// 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409 (enrolling a worker id that is already enrolled).
    #[error("the master refused: {0}")]
    Conflict(String),
    /// Any other status.
    #[error("the master answered {status} on {endpoint}: {detail}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The endpoint.
        endpoint: String,
        /// Its body.
        detail: String,
    },
    /// The answer does not parse.
    #[error("unexpected answer from {endpoint}: {detail} (client and master versions may differ)")]
    Decode {
        /// The endpoint.
        endpoint: String,
        /// Why.
        detail: String,
    },
}

impl ClientError {
    /// The HTTP status, when the master answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Unauthorized { .. } => Some(401),
            ClientError::Forbidden { .. } => Some(403),
            ClientError::Rejected(_) => Some(400),
            ClientError::NotFound(_) => Some(404),
            ClientError::Conflict(_) => Some(409),
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one master.
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
    origin: String,
    publisher_name: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

fn tls_config(ca: Option<&Path>) -> Result<Option<Arc<rustls::ClientConfig>>, ClientError> {
    let Some(ca) = ca else { return Ok(None) };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| {
        ClientError::Config(format!("cannot read CA certificate {}: {e}", ca.display()))
    })?;
    for cert in certs {
        let cert = cert.map_err(|e| {
            ClientError::Config(format!("bad PEM in CA certificate {}: {e}", ca.display()))
        })?;
        roots.add(cert).map_err(|e| {
            ClientError::Config(format!("unusable CA certificate in {}: {e}", ca.display()))
        })?;
    }
    if roots.is_empty() {
        return Err(ClientError::Config(format!(
            "no certificate in {}",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(cfg)))
}

impl Client {
    /// A client of the master at `url` (`http://` or `https://`), trusting the CA
    /// certificate(s) in `ca_cert` (PEM) instead of the public roots when given.
    pub fn new(url: &str, ca_cert: Option<&Path>) -> Result<Self, ClientError> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "master URL `{url}` must start with http:// or https://"
            )));
        }
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .max_idle_connections_per_host(4)
            .user_agent(concat!("udos/", env!("CARGO_PKG_VERSION")));
        if let Some(cfg) = tls_config(ca_cert)? {
            builder = builder.tls_config(cfg);
        }
        Ok(Self {
            base,
            agent: builder.build(),
            token: None,
            origin: "the command line".into(),
            publisher_name: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Use this token; `origin` says where it came from, for error messages.
    pub fn with_token(mut self, token: impl Into<String>, origin: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self.origin = origin.into();
        self
    }

    /// Use the token in this file.
    pub fn with_token_file(self, path: &Path) -> Result<Self, ClientError> {
        let token = read_token_file(path).map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(self.with_token(token, path.display().to_string()))
    }

    /// Name the publisher in the audit log (`X-Udos-Publisher`).
    pub fn with_publisher_name(mut self, name: impl Into<String>) -> Self {
        self.publisher_name = Some(name.into());
        self
    }

    /// Time limit of one request (long polls get their wait on top).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The master's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<ureq::Request, ClientError> {
        let mut req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .timeout(timeout);
        if !path.starts_with("/healthz") && !path.starts_with("/metrics") {
            let Some(token) = &self.token else {
                return Err(ClientError::NoToken {
                    endpoint: path.to_string(),
                });
            };
            req = req.set("Authorization", &format!("Bearer {token}"));
        }
        if let Some(name) = &self.publisher_name {
            req = req.set("X-Udos-Publisher", name);
        }
        Ok(req)
    }

    fn error(&self, endpoint: &str, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, resp) => {
                let text = resp.into_string().unwrap_or_default();
                let detail = serde_json::from_str::<ErrorBody>(&text)
                    .map(|b| b.error)
                    .unwrap_or(text);
                match status {
                    400 => ClientError::Rejected(detail),
                    401 => ClientError::Unauthorized {
                        origin: self.origin.clone(),
                        detail,
                    },
                    403 => ClientError::Forbidden {
                        origin: self.origin.clone(),
                        endpoint: endpoint.to_string(),
                        detail,
                    },
                    404 => ClientError::NotFound(detail),
                    409 => ClientError::Conflict(detail),
                    _ => ClientError::Server {
                        status,
                        endpoint: endpoint.to_string(),
                        detail,
                    },
                }
            }
            ureq::Error::Transport(t) => ClientError::Unreachable {
                url: format!("{}{endpoint}", self.base),
                detail: t.to_string(),
            },
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        resp: ureq::Response,
    ) -> Result<T, ClientError> {
        let mut body = Vec::new();
        resp.into_reader()
            .read_to_end(&mut body)
            .map_err(|e| ClientError::Unreachable {
                url: format!("{}{endpoint}", self.base),
                detail: format!("reading the answer: {e}"),
            })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            endpoint: endpoint.to_string(),
            detail: e.to_string(),
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.get_with_timeout(path, self.timeout)
    }

    fn get_with_timeout<T: DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let endpoint = path.split('?').next().unwrap_or(path);
        let resp = self
            .request("GET", path, timeout)?
            .call()
            .map_err(|e| self.error(endpoint, e))?;
        self.decode(endpoint, resp)
    }

    fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let json = serde_json::to_vec(body)
            .map_err(|e| ClientError::Config(format!("encoding the request: {e}")))?;
        let resp = self
            .request("POST", path, self.timeout)?
            .set("Content-Type", "application/json")
            .send_bytes(&json)
            .map_err(|e| self.error(path, e))?;
        self.decode(path, resp)
    }

    /// `POST /v1/publish` (publisher token).
    pub fn publish(&self, req: &PublishRequest) -> Result<PublishResponse, ClientError> {
        self.post("/v1/publish", req)
    }

    /// `POST /v1/enroll`: returns the worker's own token. With the enrollment token
    /// for a new worker id; with a worker's own token to re-enroll it (new token, labels
    /// and capacity). An id already enrolled is refused to the enrollment token (409).
    pub fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, ClientError> {
        self.post("/v1/enroll", req)
    }

    /// `POST /v1/workers/{id}/replace` (publisher token): a new token for an enrolled
    /// worker id; its current token stops working.
    pub fn replace_worker(
        &self,
        worker: &str,
        req: &ReplaceWorkerRequest,
    ) -> Result<EnrollResponse, ClientError> {
        self.post(&format!("/v1/workers/{}/replace", encode(worker)), req)
    }

    /// `GET /v1/assignment` (worker token). With `wait`, a long poll: the master answers
    /// when the active generation differs from `seen` or this worker's assignment
    /// changes, or after `wait` (at most 60 s).
    pub fn assignment(
        &self,
        worker: &str,
        seen: u64,
        wait: Option<Duration>,
    ) -> Result<AssignmentResponse, ClientError> {
        let wait_s = wait.map_or(0, |w| w.as_secs().min(60));
        let path = format!(
            "/v1/assignment?worker={}&seen={seen}&wait={wait_s}",
            encode(worker)
        );
        self.get_with_timeout(&path, self.timeout + Duration::from_secs(wait_s))
    }

    /// `POST /v1/heartbeat` (worker token).
    pub fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatResponse, ClientError> {
        self.post("/v1/heartbeat", hb)
    }

    /// `GET /v1/status` (publisher token).
    pub fn status(&self) -> Result<StatusReport, ClientError> {
        self.get("/v1/status")
    }

    /// `GET /v1/generations` (publisher token).
    pub fn generations(&self) -> Result<Vec<GenerationSummary>, ClientError> {
        self.get("/v1/generations")
    }

    /// `GET /v1/generations/{n}` (publisher or worker token).
    pub fn generation(&self, n: u64) -> Result<GenerationDetail, ClientError> {
        self.get(&format!("/v1/generations/{n}"))
    }

    /// `GET /v1/diff` (publisher token): `to` defaults to the active generation, `from`
    /// to the one before `to`.
    pub fn diff(&self, from: Option<u64>, to: Option<u64>) -> Result<DiffResponse, ClientError> {
        let mut q = Vec::new();
        if let Some(f) = from {
            q.push(format!("from={f}"));
        }
        if let Some(t) = to {
            q.push(format!("to={t}"));
        }
        let path = if q.is_empty() {
            "/v1/diff".to_string()
        } else {
            format!("/v1/diff?{}", q.join("&"))
        };
        self.get(&path)
    }

    /// `GET /v1/audit` (publisher token).
    pub fn audit(&self) -> Result<Vec<AuditEntry>, ClientError> {
        self.get("/v1/audit")
    }

    /// `GET /healthz` (no token): Ok when the master answers `ok`.
    pub fn healthz(&self) -> Result<(), ClientError> {
        let resp = self
            .request("GET", "/healthz", self.timeout)?
            .call()
            .map_err(|e| self.error("/healthz", e))?;
        let text = resp.into_string().unwrap_or_default();
        if text.trim() == "ok" {
            Ok(())
        } else {
            Err(ClientError::Decode {
                endpoint: "/healthz".into(),
                detail: format!("answered `{text}`"),
            })
        }
    }

    /// `GET /metrics` (no token): Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let resp = self
            .request("GET", "/metrics", self.timeout)?
            .call()
            .map_err(|e| self.error("/metrics", e))?;
        resp.into_string().map_err(|e| ClientError::Decode {
            endpoint: "/metrics".into(),
            detail: e.to_string(),
        })
    }
}

/// Percent-encode a query value (worker ids are `[A-Za-z0-9._-]`, but be safe).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
