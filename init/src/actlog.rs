//! act's `--json` log (logrus JSON, one object per line), turned back into console
//! lines and per-step results.
//!
//! Everything printed goes through the [`Masker`] first: the step's secrets, and each
//! `add-mask` value from the line that registers it on. The `step` field of act's
//! lines (the interpolated script, which can hold secret values) is never read, and a
//! JSON line is never printed as-is. udos's own helper steps (`udos-*`) are quiet
//! unless they fail.

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{Map, Value};
use udos_layer::mask::Masker;
use udos_layer::{ActResult, ActStep};

/// Steps whose id starts with this are udos's own (the host's `udos-setup`): their
/// console lines are held back and shown only if the step fails.
pub const HELPER_PREFIX: &str = "udos-";
/// Console bytes held back per helper step; older lines are dropped beyond this.
const HELD_MAX_BYTES: usize = 256 << 10;

/// The fields udos reads of one log line; the rest (`step` included) is ignored.
#[derive(Debug, Default)]
struct Entry {
    msg: Option<String>,
    level: Option<String>,
    /// The first of `stepID` (composite actions nest): the workflow step's id.
    step_id: Option<String>,
    step_result: Option<String>,
    command: Option<String>,
    name: Option<String>,
    arg: Option<String>,
    /// A `summary` command's text.
    content: Option<String>,
    raw_output: bool,
}

impl Entry {
    /// A JSON object line, read field by field: a field of an unexpected type is
    /// absent rather than a reason to show the raw line.
    fn parse(line: &str) -> Option<Entry> {
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(line) else {
            return None;
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
        Some(Entry {
            msg: text("msg"),
            level: text("level"),
            step_id: first_step_id(&map),
            step_result: text("stepResult"),
            command: text("command"),
            name: text("name"),
            arg: text("arg"),
            content: text("content"),
            raw_output: map.get("raw_output").and_then(Value::as_bool) == Some(true),
        })
    }

    /// act's result word, read as the record does (unknown words are failures).
    fn result(&self) -> Option<ActResult> {
        let word = self.step_result.as_deref()?;
        Some(ActResult::from_act(word).unwrap_or(ActResult::Failure))
    }
}

fn first_step_id(map: &Map<String, Value>) -> Option<String> {
    let id = match map.get("stepID")? {
        Value::Array(ids) => ids.first()?.as_str()?,
        Value::String(id) => id,
        _ => return None,
    };
    Some(id.to_string())
}

/// Whether a helper step's lines are still held, shown or dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum HeldState {
    /// No result yet: keep the lines.
    #[default]
    Holding,
    /// It failed: show everything.
    Shown,
    /// It succeeded or was skipped: show nothing.
    Dropped,
}

/// A helper step's console lines, bounded.
#[derive(Debug, Default)]
struct Held {
    lines: VecDeque<String>,
    bytes: usize,
    dropped: usize,
    state: HeldState,
}

impl Held {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > HELD_MAX_BYTES && self.lines.len() > 1 {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len();
                self.dropped += 1;
            }
        }
    }

    fn take(&mut self, id: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.dropped > 0 {
            out.push(format!(
                "udos-init: ({} earlier line(s) of step {id} not kept)",
                self.dropped
            ));
        }
        out.extend(self.lines.drain(..));
        self.bytes = 0;
        self.dropped = 0;
        out
    }
}

/// What act reported, step by step, in order of first appearance.
#[derive(Debug, Default)]
pub struct ActLog {
    steps: Vec<ActStep>,
    index: HashMap<String, usize>,
    /// Non-output warnings/errors already shown: act repeats some (git lookups) for
    /// every step, and each console byte is slow on an emulated serial port.
    shown: HashSet<String>,
    masker: Masker,
    held: HashMap<String, Held>,
    /// Inside an over-long JSON line, whose pieces are not shown.
    in_long_json: bool,
}

impl ActLog {
    /// A log whose console lines hide what `masker` hides (and `add-mask` values).
    pub fn new(masker: Masker) -> Self {
        ActLog {
            masker,
            ..ActLog::default()
        }
    }

    /// Takes one piece of act's output; returns what to print on the console.
    pub fn handle_piece(&mut self, piece: Piece) -> Vec<String> {
        if !piece.cut_start && !piece.cut_end {
            return self.handle_line(&piece.text);
        }
        // A piece of a line over MAX_LINE: it cannot be parsed. A JSON line is not
        // shown (it carries act's `step` field); other text is, with cut edges masked.
        if !piece.cut_start {
            self.in_long_json = piece.text.starts_with('{');
            if self.in_long_json {
                return vec![
                    "udos-init: warning: act printed a log line over 1 MiB; not shown".into(),
                ];
            }
        }
        let long_json = self.in_long_json;
        if !piece.cut_end {
            self.in_long_json = false;
        }
        if long_json {
            return Vec::new();
        }
        vec![self
            .masker
            .mask_cut(&piece.text, piece.cut_start, piece.cut_end)]
    }

    /// Takes one whole line of act's output; returns what to print on the console.
    pub fn handle_line(&mut self, line: &str) -> Vec<String> {
        let line = line.trim_end_matches(['\n', '\r']);
        let entry = match line.starts_with('{') {
            true => Entry::parse(line),
            false => None,
        };
        let Some(entry) = entry else {
            return vec![self.masker.mask(line).into_owned()];
        };
        // Registered first, so that this very line is masked too.
        if let (Some("add-mask"), Some(value)) = (entry.command.as_deref(), &entry.arg) {
            self.masker.add(value);
        }
        let mut out = Vec::new();
        let helper = entry
            .step_id
            .as_deref()
            .filter(|id| id.starts_with(HELPER_PREFIX))
            .map(str::to_string);
        if let Some(id) = entry.step_id.as_deref() {
            out.extend(self.record(id, &entry));
        }
        let text = self.console_text(&entry, helper.is_none());
        match helper {
            Some(id) => out.extend(self.hold(&id, text, entry.result())),
            None => out.extend(text),
        }
        out
    }

    /// Collects what `entry` says about step `id`; returns a warning to print, if any.
    fn record(&mut self, id: &str, entry: &Entry) -> Option<String> {
        let summary = entry
            .content
            .as_deref()
            .map(|c| self.masker.mask(c).into_owned());
        let mut warning = None;
        let step = self.step_mut(id);
        if let Some(word) = entry.step_result.as_deref() {
            step.result = ActResult::from_act(word).unwrap_or_else(|| {
                warning = Some(format!(
                    "udos-init: warning: act reported stepResult {word:?} for step {id}; recorded as failure"
                ));
                ActResult::Failure
            });
        }
        match (entry.command.as_deref(), &entry.name, &entry.arg) {
            (Some("set-output"), Some(name), Some(arg)) => {
                step.outputs.insert(name.clone(), arg.clone());
            }
            (Some("set-env"), Some(name), Some(arg)) => {
                step.env.insert(name.clone(), arg.clone());
            }
            (Some("add-path"), _, Some(arg)) => step.path.push(arg.clone()),
            // Blank values are no masks (as in the Masker).
            (Some("add-mask"), _, Some(arg))
                if !arg.trim().is_empty() && !step.masks.contains(arg) =>
            {
                step.masks.push(arg.clone());
            }
            (Some("summary"), _, _) => {
                if let Some(summary) = &summary {
                    step.append_summary(summary);
                }
            }
            _ => {}
        }
        // act reports a failed `run:` step's status as an error line of its own.
        if entry.level.as_deref() == Some("error") {
            if let Some(code) = entry
                .msg
                .as_deref()
                .and_then(|m| m.trim().strip_prefix("exit status "))
                .and_then(|n| n.trim().parse::<i32>().ok())
            {
                step.exit_code = Some(code);
            }
        }
        warning.map(|w| self.masker.mask(&w).into_owned())
    }

    /// The console line for `entry` (its masked `msg`), if it is shown at all.
    /// `remember`: count a warning as shown (not for held lines, which may never be).
    fn console_text(&mut self, entry: &Entry, remember: bool) -> Option<String> {
        let msg = entry.msg.as_deref()?.trim_end_matches(['\n', '\r']);
        let msg = self.masker.mask(msg);
        if entry.raw_output {
            let lines: Vec<String> = msg.split('\n').map(|l| format!("  | {l}")).collect();
            return Some(lines.join("\n"));
        }
        if matches!(entry.level.as_deref(), Some("debug" | "trace")) {
            return None;
        }
        if matches!(entry.level.as_deref(), Some("warning" | "error")) {
            if self.shown.contains(msg.as_ref()) {
                return None;
            }
            if remember {
                self.shown.insert(msg.to_string());
            }
        }
        Some(msg.into_owned())
    }

    /// A helper step's line: held until its result says whether to show it.
    fn hold(&mut self, id: &str, text: Option<String>, result: Option<ActResult>) -> Vec<String> {
        let held = self.held.entry(id.to_string()).or_default();
        let failed = result == Some(ActResult::Failure);
        match held.state {
            HeldState::Shown => return text.into_iter().collect(),
            HeldState::Dropped if failed => {
                held.state = HeldState::Shown;
                return text.into_iter().collect();
            }
            HeldState::Dropped => return Vec::new(),
            HeldState::Holding => {}
        }
        if let Some(text) = text {
            held.push(text);
        }
        match result {
            None => Vec::new(),
            Some(ActResult::Failure) => {
                held.state = HeldState::Shown;
                held.take(id)
            }
            Some(ActResult::Success | ActResult::Skipped) => {
                held.state = HeldState::Dropped;
                held.take(id);
                Vec::new()
            }
        }
    }

    /// At the end of act: the held lines of helper steps that never reported a result
    /// (act died mid-step), which therefore did not succeed.
    pub fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for step in &self.steps {
            if let Some(held) = self.held.get_mut(&step.id) {
                if held.state == HeldState::Holding {
                    held.state = HeldState::Shown;
                    out.extend(held.take(&step.id));
                }
            }
        }
        out
    }

    fn step_mut(&mut self, id: &str) -> &mut ActStep {
        let i = *self.index.entry(id.to_string()).or_insert_with(|| {
            self.steps.push(ActStep {
                id: id.to_string(),
                ..ActStep::default()
            });
            self.steps.len() - 1
        });
        &mut self.steps[i]
    }

    pub fn into_steps(self) -> Vec<ActStep> {
        self.steps
    }
}

/// One line of act's output, or a piece of a line too long to keep whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// The text continues a line cut before it.
    pub cut_start: bool,
    /// The line goes on in the next piece.
    pub cut_end: bool,
}

/// Splits a byte stream into lines; bytes are decoded lossily (a step may print anything).
#[derive(Debug, Default)]
pub struct Lines {
    buf: Vec<u8>,
    /// The next piece continues a cut line.
    continued: bool,
}

/// One line of act's output longer than this is cut (and handled in pieces): PID 1
/// must not grow without bound on a step that prints a gigabyte without a newline.
const MAX_LINE: usize = 1 << 20;

impl Lines {
    /// Appends bytes; returns the complete lines, and pieces of over-long ones.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        self.push_with_limit(bytes, MAX_LINE)
    }

    fn push_with_limit(&mut self, bytes: &[u8], max_line: usize) -> Vec<Piece> {
        self.buf.extend_from_slice(bytes);
        let mut pieces = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            pieces.push(self.piece(start, start + nl, false));
            start += nl + 1;
        }
        while self.buf.len() - start > max_line {
            // Cut at a character boundary: a character split in two would be decoded
            // as two U+FFFD and hide a secret from the masker.
            let mut cut = start + max_line;
            while cut > start + 1 && (self.buf[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            pieces.push(self.piece(start, cut, true));
            start = cut;
        }
        self.buf.drain(..start);
        pieces
    }

    fn piece(&mut self, from: usize, to: usize, cut_end: bool) -> Piece {
        let piece = Piece {
            text: String::from_utf8_lossy(&self.buf[from..to]).into_owned(),
            cut_start: self.continued,
            cut_end,
        };
        self.continued = cut_end;
        piece
    }

    /// The unterminated last line, if any.
    pub fn finish(&mut self) -> Option<Piece> {
        if self.buf.is_empty() {
            return None;
        }
        let piece = self.piece(0, self.buf.len(), false);
        self.buf.clear();
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(log: &mut ActLog, text: &str) -> Vec<String> {
        text.lines().flat_map(|l| log.handle_line(l)).collect()
    }

    #[test]
    fn a_failed_steps_exit_status_is_recorded() {
        let mut log = ActLog::default();
        feed(
            &mut log,
            r#"{"level":"info","msg":"  ❌  Failure - Main exit 3","stepID":["s"],"stepResult":"failure"}
{"level":"error","msg":"exit status 3","stepID":["s"]}
{"level":"error","msg":"exit status x","stepID":["t"]}"#,
        );
        let steps = log.into_steps();
        assert_eq!(steps[0].exit_code, Some(3));
        assert_eq!(steps[0].result, ActResult::Failure);
        assert_eq!(steps[1].exit_code, None);
    }

    // Lines as act 0.2.89 prints them (trimmed of fields udos ignores).
    const LOG: &str = r#"{"level":"info","msg":"⭐ Run Set up job","step":"Set up job","stepid":["--setup-job"]}
{"level":"warning","msg":"unable to get git ref: repository does not exist","stepID":["one"]}
{"level":"info","msg":"hello\n","raw_output":true,"stage":"Main","stepID":["one"]}
{"level":"info","msg":"  ✅  Success - Main echo hello","stepID":["one"],"stepResult":"success"}
{"arg":"bar","command":"set-env","level":"info","msg":"  ⚙  ::set-env:: FOO=bar","name":"FOO","stepID":["one"]}
{"arg":"hi there","command":"set-output","level":"info","msg":"  ⚙  ::set-output:: greeting=hi there","name":"greeting","stepID":["one"]}
{"arg":"/opt/xbin","command":"add-path","level":"info","msg":"  ⚙  ::add-path:: /opt/xbin","stepID":["one"]}
{"level":"warning","msg":"unable to get git ref: repository does not exist","stepID":["two"]}
{"level":"info","msg":"a\nb\n","raw_output":true,"stepID":["two","inner"]}
{"level":"info","msg":"  ❌  Failure - Main exit 3","stepID":["two"],"stepResult":"failure"}
Error: Job 'udos' failed"#;

    #[test]
    fn collects_results_and_commands_per_step() {
        let mut log = ActLog::default();
        let console = feed(&mut log, LOG);
        assert_eq!(
            console,
            [
                "⭐ Run Set up job",
                "unable to get git ref: repository does not exist",
                "  | hello",
                "  ✅  Success - Main echo hello",
                "  ⚙  ::set-env:: FOO=bar",
                "  ⚙  ::set-output:: greeting=hi there",
                "  ⚙  ::add-path:: /opt/xbin",
                "  | a\n  | b",
                "  ❌  Failure - Main exit 3",
                "Error: Job 'udos' failed",
            ]
        );
        let steps = log.into_steps();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].id, "one");
        assert_eq!(steps[0].result, ActResult::Success);
        assert_eq!(steps[0].outputs["greeting"], "hi there");
        assert_eq!(steps[0].env["FOO"], "bar");
        assert_eq!(steps[0].path, ["/opt/xbin"]);
        assert_eq!(steps[1].id, "two");
        assert_eq!(steps[1].result, ActResult::Failure);
        assert!(steps[1].outputs.is_empty());
    }

    // What act 0.2.89 printed for a step with secrets S=topsecret1 and M=line1\nline2,
    // an add-mask, a summary and an output (trimmed; `step` shortened but kept).
    const SECRET_LOG: &str = r##"{"level":"info","msg":"single ***\n","raw_output":true,"stage":"Main","step":"echo \"single topsecret1\"","stepID":["s"]}
{"level":"info","msg":"multi line1\n","raw_output":true,"stage":"Main","stepID":["s"]}
{"level":"info","msg":"line2\n","raw_output":true,"stage":"Main","stepID":["s"]}
{"level":"info","msg":"before maskme42\n","raw_output":true,"stage":"Main","stepID":["s"]}
{"arg":"maskme42","command":"add-mask","kvPairs":{},"level":"info","msg":"  ⚙  ***","raw":"::add-mask::maskme42\n","stage":"Main","stepID":["s"]}
{"level":"info","msg":"after maskme42 here\n","raw_output":true,"stage":"Main","stepID":["s"]}
{"executionTime":3323001,"level":"info","msg":"  ✅  Success - Main add-mask command","stage":"Main","stepID":["s"],"stepResult":"success"}
{"arg":"val maskme42","command":"set-output","level":"info","msg":"  ⚙  ::set-output:: o=val ***","name":"o","stage":"Main","stepID":["s"]}
{"command":"summary","content":"# sum maskme42 topsecret1\n","level":"info","msg":"  ⚙  Summary - # sum ***\n","stage":"Main","stepID":["s"]}
{"command":"summary","content":"more\n","level":"info","msg":"  ⚙  Summary - more\n","stage":"Main","stepID":["s"]}
{"level":"info","msg":"topsecret1 in a non-raw message","stepID":["s"]}
not JSON: topsecret1 line2"##;

    fn secret_masker() -> Masker {
        let mut m = Masker::new();
        m.add_secret("topsecret1");
        m.add_secret("line1\nline2");
        m
    }

    #[test]
    fn masks_secrets_and_add_mask_values_and_collects_masks_and_summary() {
        let mut log = ActLog::new(secret_masker());
        let console = feed(&mut log, SECRET_LOG).join("\n");
        // `echo ` is from the `step` field (the script), which is never shown.
        for hidden in ["topsecret1", "line1", "line2", "after maskme42", "echo "] {
            assert!(!console.contains(hidden), "{hidden:?} in:\n{console}");
        }
        assert!(console.contains("  | multi ***"), "{console}");
        assert!(console.contains("  | after *** here"), "{console}");
        assert!(console.contains("not JSON: *** ***"), "{console}");
        // Before it was registered, a value is not a mask (as on GitHub).
        assert!(console.contains("  | before maskme42"), "{console}");
        let steps = log.into_steps();
        let s = &steps[0];
        assert_eq!(s.masks, ["maskme42"]);
        assert_eq!(s.summary.as_deref(), Some("# sum *** ***\nmore\n"));
        // Outputs stay raw: the host masks what it keeps.
        assert_eq!(s.outputs["o"], "val maskme42");
        assert_eq!(s.result, ActResult::Success);
    }

    #[test]
    fn json_lines_are_never_printed_raw() {
        let mut log = ActLog::new(secret_masker());
        // A field of an unexpected type must not make the whole line (and its `step`
        // field) fall through to the console.
        let out = log.handle_line(
            r#"{"level":5,"msg":"shown","step":"SCRIPT-MARKER","stepID":{"x":1},"raw_output":"yes"}"#,
        );
        assert_eq!(out, ["shown"]);
        assert!(log.handle_line(r#"{"step":"SCRIPT-MARKER"}"#).is_empty());
    }

    #[test]
    fn an_unknown_result_is_a_failure_with_a_warning() {
        let mut log = ActLog::default();
        let out = log.handle_line(
            r#"{"level":"info","msg":"done","stepID":["s"],"stepResult":"cancelled"}"#,
        );
        assert_eq!(
            out,
            [
                "udos-init: warning: act reported stepResult \"cancelled\" for step s; recorded as failure",
                "done"
            ]
        );
        assert_eq!(log.into_steps()[0].result, ActResult::Failure);
    }

    const HELPER_OK: &str = r#"{"level":"info","msg":"⭐ Run Main udos setup","stepID":["udos-setup"]}
{"level":"warning","msg":"unable to get git ref","stepID":["udos-setup"]}
{"level":"info","msg":"setup-noise\n","raw_output":true,"stepID":["udos-setup"]}
{"level":"info","msg":"  ✅  Success - Main udos setup","stepID":["udos-setup"],"stepResult":"success"}
{"level":"warning","msg":"unable to get git ref","stepID":["build"]}
{"level":"info","msg":"built\n","raw_output":true,"stepID":["build"]}"#;

    #[test]
    fn helper_steps_are_quiet_when_they_succeed() {
        let mut log = ActLog::default();
        let console = feed(&mut log, HELPER_OK);
        // The warning was never shown (only held), so the user step still shows it.
        assert_eq!(console, ["unable to get git ref", "  | built"]);
        assert!(log.finish().is_empty());
        let steps = log.into_steps();
        assert_eq!(steps[0].id, "udos-setup", "still in the record");
        assert_eq!(steps[0].result, ActResult::Success);
    }

    #[test]
    fn helper_steps_show_everything_when_they_fail() {
        let mut log = ActLog::default();
        let console = feed(
            &mut log,
            r#"{"level":"info","msg":"⭐ Run Main udos setup","stepID":["udos-setup"]}
{"level":"info","msg":"ln: cannot link\n","raw_output":true,"stepID":["udos-setup"]}
{"level":"info","msg":"  ❌  Failure - Main udos setup","stepID":["udos-setup"],"stepResult":"failure"}
{"level":"error","msg":"exit status 1","stepID":["udos-setup"]}"#,
        );
        assert_eq!(
            console,
            [
                "⭐ Run Main udos setup",
                "  | ln: cannot link",
                "  ❌  Failure - Main udos setup",
                "exit status 1"
            ]
        );
    }

    #[test]
    fn helper_steps_without_a_result_are_shown_at_the_end() {
        let mut log = ActLog::default();
        let console = feed(
            &mut log,
            r#"{"level":"info","msg":"setup started\n","raw_output":true,"stepID":["udos-setup"]}"#,
        );
        assert!(console.is_empty());
        assert_eq!(log.finish(), ["  | setup started"]);
        assert!(log.finish().is_empty(), "shown once");
    }

    #[test]
    fn held_lines_are_bounded() {
        let mut log = ActLog::default();
        let line = format!(
            r#"{{"level":"info","msg":"{}\n","raw_output":true,"stepID":["udos-x"]}}"#,
            "x".repeat(1000)
        );
        for _ in 0..1000 {
            assert!(log.handle_line(&line).is_empty());
        }
        let out = log.finish();
        let bytes: usize = out.iter().map(String::len).sum();
        assert!(bytes <= HELD_MAX_BYTES + 200, "{bytes}");
        assert!(out[0].starts_with("udos-init: ("), "{}", out[0]);
        assert!(out[0].contains("earlier line(s) of step udos-x not kept"));
    }

    #[test]
    fn lines_split_across_reads() {
        let mut lines = Lines::default();
        assert!(lines.push(b"ab").is_empty());
        let texts: Vec<String> = lines
            .push(b"c\nd\n\xffe")
            .into_iter()
            .map(|p| p.text)
            .collect();
        assert_eq!(texts, ["abc", "d"]);
        assert_eq!(lines.finish().map(|p| p.text).as_deref(), Some("\u{fffd}e"));
        assert_eq!(lines.finish(), None);
    }

    #[test]
    fn over_long_lines_are_cut_at_character_boundaries() {
        let mut lines = Lines::default();
        // "é" is 2 bytes; a limit of 4 would split the third one.
        let pieces = lines.push_with_limit("aéé€b\nok\n".as_bytes(), 4);
        let got: Vec<(&str, bool, bool)> = pieces
            .iter()
            .map(|p| (p.text.as_str(), p.cut_start, p.cut_end))
            .collect();
        // The whole line is there first (it had its newline), then "ok".
        assert_eq!(got, [("aéé€b", false, false), ("ok", false, false)]);
        let pieces = lines.push_with_limit("aéé€bcd".as_bytes(), 4);
        let got: Vec<(&str, bool, bool)> = pieces
            .iter()
            .map(|p| (p.text.as_str(), p.cut_start, p.cut_end))
            .collect();
        assert_eq!(
            got,
            [("aé", false, true), ("é", true, true), ("€b", true, true)]
        );
        let last = lines.finish().unwrap();
        assert_eq!(
            (last.text.as_str(), last.cut_start, last.cut_end),
            ("cd", true, false)
        );
    }

    #[test]
    fn pieces_of_over_long_lines() {
        let mut log = ActLog::new(secret_masker());
        let piece = |text: &str, cut_start, cut_end| Piece {
            text: text.into(),
            cut_start,
            cut_end,
        };
        // A secret cut in two is hidden on both sides of the cut.
        assert_eq!(log.handle_piece(piece("x topsec", false, true)), ["x ***"]);
        assert_eq!(log.handle_piece(piece("ret1 y", true, false)), ["*** y"]);
        // A JSON line is never shown in pieces.
        let out = log.handle_piece(piece(r#"{"step":"echo topsecret1"#, false, true));
        assert_eq!(out.len(), 1);
        assert!(out[0].contains("over 1 MiB; not shown"));
        assert!(log.handle_piece(piece("more", true, true)).is_empty());
        assert!(log.handle_piece(piece("\"}", true, false)).is_empty());
        assert_eq!(log.handle_piece(piece("plain", false, false)), ["plain"]);
    }
}
