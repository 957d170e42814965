//! Job mode's channel (docs/job-mode.md): the host and PID 1 of a job VM exchange
//! length-prefixed JSON frames over one virtio-console port. One type per direction,
//! used by both sides: [`JobMessage`] (host → guest) and [`GuestMessage`] (guest →
//! host).
//!
//! A frame is a 4-byte big-endian length, then that many bytes of JSON. Both sides
//! treat what they read as untrusted: a length over the reader's bound, a stream that
//! ends inside a frame, or JSON that is not a message is an error, never a panic.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::record::StepRecord;
use crate::secrets::StepSecrets;

/// The virtio-console port's name (`udos.channel`).
pub const CHANNEL_NAME: &str = "udos.ctl";
/// The largest frame either side accepts (a step's control files travel in one).
pub const MAX_FRAME: usize = 64 << 20;

/// A frame that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The channel failed.
    #[error("job channel: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a frame.
    #[error("job channel: the stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// A frame longer than the bound.
    #[error("job channel: a frame of {len} bytes is over the {max}-byte bound")]
    TooLarge {
        /// Its announced (or, writing, actual) length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The frame is not a message of the expected kind.
    #[error("job channel: not a message: {0}")]
    Parse(#[from] serde_json::Error),
}

/// One file or link the step's control layer would have held (`/.actrc`,
/// `/.udos/step.yml`, `/.udos/event.json`, `/.udos/actions/...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlFile {
    /// A regular file.
    File {
        /// Absolute path in the step root.
        path: String,
        /// Permission bits (`0o644`, `0o755`).
        mode: u32,
        /// The content, base64 in the JSON.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Absolute path in the step root.
        path: String,
        /// Where it points.
        target: String,
    },
}

impl ControlFile {
    /// Where it goes in the step root.
    pub fn path(&self) -> &str {
        match self {
            ControlFile::File { path, .. } | ControlFile::Symlink { path, .. } => path,
        }
    }
}

/// One step for the job VM to run.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStep {
    /// The step's control files, written into the root for the step and removed after.
    pub files: Vec<ControlFile>,
    /// What step mode reads from the secrets device.
    pub secrets: StepSecrets,
    /// act gets SIGTERM after this many seconds (as `udos.timeout` in step mode).
    pub timeout_secs: f64,
}

impl std::fmt::Debug for JobStep {
    // Never the files' bytes (event payloads, scripts) nor the secrets' values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStep")
            .field(
                "files",
                &self.files.iter().map(ControlFile::path).collect::<Vec<_>>(),
            )
            .field("secrets", &self.secrets)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobMessage {
    /// Run this step, then answer [`GuestMessage::StepDone`].
    Step(Box<JobStep>),
    /// No more steps: seal the job's layer and power off.
    Seal,
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// The root is assembled; send steps.
    Ready,
    /// A step ended: its record, as step mode would have sealed it (without a layer).
    StepDone(Box<StepRecord>),
}

/// Writes `payload` as one frame.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME,
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: MAX_FRAME,
    })?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame of at most `max` bytes; `None` on a clean end of stream (before
/// the first byte of a frame).
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut head = [0u8; 4];
    let got = read_full(r, &mut head)?;
    if got == 0 {
        return Ok(None);
    }
    if got < head.len() {
        return Err(FrameError::Truncated { got, want: 4 });
    }
    let len = u32::from_be_bytes(head) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(FrameError::Truncated { got, want: len });
    }
    Ok(Some(body))
}

/// Reads until `buf` is full or the stream ends; how many bytes it read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Sends `message` as one frame of JSON.
pub fn send<T: Serialize>(w: &mut impl Write, message: &T) -> Result<(), FrameError> {
    write_frame(w, &serde_json::to_vec(message)?)
}

/// Reads one message; `None` on a clean end of stream.
pub fn recv<T: serde::de::DeserializeOwned>(
    r: &mut impl Read,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_frame(r, max)? {
        Some(body) => Ok(Some(serde_json::from_slice(&body)?)),
        None => Ok(None),
    }
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordStatus;
    use base64::Engine as _;

    fn step() -> JobMessage {
        let mut secrets = StepSecrets::default();
        secrets.secrets.insert("TOKEN".into(), "s3cret".into());
        secrets.masks.push("masked".into());
        JobMessage::Step(Box::new(JobStep {
            files: vec![
                ControlFile::File {
                    path: "/.actrc".into(),
                    mode: 0o644,
                    data: b"-W /.udos/step.yml\n\xff\x00".to_vec(),
                },
                ControlFile::Symlink {
                    path: "/.udos/actions/a/link".into(),
                    target: "x".into(),
                },
            ],
            secrets,
            timeout_secs: 1.5,
        }))
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let mut buf = Vec::new();
        send(&mut buf, &step()).unwrap();
        send(&mut buf, &JobMessage::Seal).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(recv::<JobMessage>(&mut r, MAX_FRAME).unwrap(), Some(step()));
        assert_eq!(
            recv::<JobMessage>(&mut r, MAX_FRAME).unwrap(),
            Some(JobMessage::Seal)
        );
        assert_eq!(recv::<JobMessage>(&mut r, MAX_FRAME).unwrap(), None);

        let done = GuestMessage::StepDone(Box::new(StepRecord::error("boom")));
        let mut buf = Vec::new();
        send(&mut buf, &GuestMessage::Ready).unwrap();
        send(&mut buf, &done).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(recv(&mut r, MAX_FRAME).unwrap(), Some(GuestMessage::Ready));
        let back: GuestMessage = recv(&mut r, MAX_FRAME).unwrap().unwrap();
        let GuestMessage::StepDone(rec) = back else {
            panic!("not a StepDone: {back:?}")
        };
        assert_eq!(rec.status, RecordStatus::Error);
        assert_eq!(rec.error.as_deref(), Some("boom"));
    }

    #[test]
    fn truncated_frames_are_errors() {
        let mut buf = Vec::new();
        send(&mut buf, &JobMessage::Seal).unwrap();
        for cut in [1, 3, 4, buf.len() - 1] {
            let err = recv::<JobMessage>(&mut &buf[..cut], MAX_FRAME).unwrap_err();
            assert!(matches!(err, FrameError::Truncated { .. }), "{cut}: {err}");
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let mut buf = (1000u32).to_be_bytes().to_vec();
        buf.extend([b' '; 10]);
        let err = read_frame(&mut buf.as_slice(), 999).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 1000,
                    max: 999
                }
            ),
            "{err}"
        );
        let huge = u32::MAX.to_be_bytes();
        let err = read_frame(&mut huge.as_slice(), MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        let err = write_frame(&mut Vec::new(), &vec![0; MAX_FRAME + 1]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn garbage_is_a_parse_error() {
        for body in [
            &b"not json"[..],
            br#"{"type":"launch"}"#,
            br#"{"type":"step_done"}"#,
            br#"{"type":"ready","extra":1}"#,
            br#"{"type":"step","files":[{"kind":"file","path":"/a","mode":420,"data":"!!"}],"secrets":{},"timeout_secs":1}"#,
        ] {
            let mut buf = Vec::new();
            write_frame(&mut buf, body).unwrap();
            let a = recv::<GuestMessage>(&mut buf.as_slice(), MAX_FRAME);
            let b = recv::<JobMessage>(&mut buf.as_slice(), MAX_FRAME);
            assert!(
                matches!(a, Err(FrameError::Parse(_))) || matches!(b, Err(FrameError::Parse(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
            if body.starts_with(b"{\"type\":\"step\"") || body == b"not json" {
                assert!(matches!(b, Err(FrameError::Parse(_))));
            }
        }
    }

    #[test]
    fn file_data_is_base64_in_the_json() {
        let text = serde_json::to_string(&step()).unwrap();
        assert!(text.contains(
            &base64::engine::general_purpose::STANDARD.encode(b"-W /.udos/step.yml\n\xff\x00")
        ));
    }
}
