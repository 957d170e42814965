//! Hiding secret values in text before it is shown or stored: PID 1 masks its console
//! with it, the host its own copies of the log.
//!
//! Every byte covered by an occurrence of any mask becomes part of a `***`;
//! occurrences that overlap become one `***`. That is what GitHub's "longest first"
//! aims at (a mask inside a longer one never leaves the rest of the longer one
//! visible), and it also hides partial overlaps (`abc` and `bcd` in `abcd`), which
//! replacing one mask after the other would leave half shown.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use aho_corasick::AhoCorasick;

/// What a masked value is replaced with.
pub const MASK: &str = "***";

/// A set of values to hide. Cheap to extend; the matcher is rebuilt lazily, on the
/// first [`Masker::mask`] after a change.
#[derive(Clone, Default)]
pub struct Masker {
    /// Sorted, no duplicates.
    masks: Vec<String>,
    matcher: OnceLock<Option<AhoCorasick>>,
}

impl fmt::Debug for Masker {
    /// Never the values: a `{:?}` in a log must not undo the masking.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("masks", &self.masks.len())
            .finish()
    }
}

/// Whether `value` can be a mask: blank values are ignored, since masking every space
/// would wreck the log and reveal nothing.
fn maskable(value: &str) -> bool {
    !value.trim().is_empty()
}

impl Masker {
    /// An empty masker: [`Masker::mask`] returns its input.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hides `value` from now on (an `add-mask`). Blank values are ignored. Returns
    /// whether it was new.
    pub fn add(&mut self, value: &str) -> bool {
        if !maskable(value) {
            return false;
        }
        match self.masks.binary_search_by(|m| m.as_str().cmp(value)) {
            Ok(_) => false,
            Err(at) => {
                self.masks.insert(at, value.to_string());
                self.matcher = OnceLock::new();
                true
            }
        }
    }

    /// Hides a secret: the whole value and, for a multi-line value, each of its lines
    /// (without a trailing `\r`), since a log shows a multi-line value line by line.
    pub fn add_secret(&mut self, value: &str) {
        self.add(value);
        if value.contains('\n') {
            for line in value.split('\n') {
                self.add(line.strip_suffix('\r').unwrap_or(line));
            }
        }
    }

    /// How many distinct masks there are.
    pub fn len(&self) -> usize {
        self.masks.len()
    }

    /// Whether there is nothing to hide.
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    fn matcher(&self) -> Option<&AhoCorasick> {
        self.matcher
            .get_or_init(|| {
                // Standard match kind: the only one that reports overlapping matches.
                (!self.masks.is_empty())
                    .then(|| AhoCorasick::new(&self.masks).ok())
                    .flatten()
            })
            .as_ref()
    }

    /// `text` with every occurrence of every mask replaced (see the module docs).
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let Some(matcher) = self.matcher() else {
            return Cow::Borrowed(text);
        };
        let mut hidden: Vec<(usize, usize)> = matcher
            .find_overlapping_iter(text)
            .map(|m| (m.start(), m.end()))
            .collect();
        if hidden.is_empty() {
            return Cow::Borrowed(text);
        }
        hidden.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut shown_to = 0;
        for (start, end) in hidden {
            if start < shown_to {
                // Overlaps the range just hidden: extend it.
                shown_to = shown_to.max(end);
                continue;
            }
            out.push_str(&text[shown_to..start]);
            out.push_str(MASK);
            shown_to = end;
        }
        out.push_str(&text[shown_to..]);
        Cow::Owned(out)
    }

    /// Masks a piece of a longer text that was cut (at its start and/or its end). Besides
    /// [`Masker::mask`], hides a cut edge that could be part of a mask: a tail that is
    /// the beginning of some mask, a head that is the end of one.
    pub fn mask_cut(&self, text: &str, cut_start: bool, cut_end: bool) -> String {
        let mut text = self.mask(text).into_owned();
        if cut_end {
            if let Some(len) = self.longest_edge(&text, |t, part| t.ends_with(part), true) {
                text.truncate(text.len() - len);
                text.push_str(MASK);
            }
        }
        if cut_start {
            if let Some(len) = self.longest_edge(&text, |t, part| t.starts_with(part), false) {
                text.replace_range(..len, MASK);
            }
        }
        text
    }

    /// The longest proper prefix (`prefixes`) or suffix of any mask that `matches` the
    /// edge of `text`.
    fn longest_edge(
        &self,
        text: &str,
        matches: impl Fn(&str, &str) -> bool,
        prefixes: bool,
    ) -> Option<usize> {
        self.masks
            .iter()
            .flat_map(|m| {
                (1..m.len())
                    .filter(|&k| m.is_char_boundary(k))
                    .map(move |k| if prefixes { &m[..k] } else { &m[k..] })
            })
            .filter(|part| matches(text, part))
            .map(str::len)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(masks: &[&str]) -> Masker {
        let mut m = Masker::new();
        for v in masks {
            m.add(v);
        }
        m
    }

    #[test]
    fn no_masks_no_change() {
        let m = Masker::new();
        assert!(matches!(m.mask("anything"), Cow::Borrowed("anything")));
        assert!(matches!(
            masker(&["x"]).mask("nothing here"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn every_occurrence_is_replaced() {
        let m = masker(&["hunter2"]);
        assert_eq!(
            m.mask("pw=hunter2 again hunter2hunter2"),
            "pw=*** again ******"
        );
    }

    #[test]
    fn a_longer_mask_wins_over_one_inside_it() {
        // "cret" alone would leave "se" and "t1" of the longer secret visible.
        let m = masker(&["cret", "secret1"]);
        assert_eq!(m.mask("a secret1 and a cret"), "a *** and a ***");
    }

    #[test]
    fn overlapping_occurrences_are_hidden_as_one() {
        let m = masker(&["abc", "bcd"]);
        assert_eq!(m.mask("xabcdx"), "x***x");
        // One mask overlapping itself.
        assert_eq!(masker(&["aa"]).mask("aaa b"), "*** b");
    }

    #[test]
    fn multi_line_secrets_are_hidden_line_by_line() {
        let mut m = Masker::new();
        m.add_secret("first line\r\nsecond line\n\n  \nthird");
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(
            m.mask("first line\r\nsecond line\n\n  \nthird"),
            "***",
            "the whole value"
        );
        assert_eq!(m.mask("> first line"), "> ***");
        assert_eq!(m.mask("second line, third"), "***, ***");
        assert_eq!(m.mask("a  b"), "a  b", "blank lines are not masks");
    }

    #[test]
    fn empty_and_blank_values_are_ignored() {
        let mut m = Masker::new();
        assert!(!m.add(""));
        assert!(!m.add(" \t"));
        m.add_secret("");
        assert!(m.is_empty());
        assert!(m.add("v"));
        assert!(!m.add("v"), "duplicates are not new");
        assert_eq!(m.mask("a v"), "a ***");
    }

    #[test]
    fn added_masks_apply_from_then_on() {
        let mut m = masker(&["one"]);
        assert_eq!(m.mask("one two"), "*** two");
        m.add("two");
        assert_eq!(m.mask("one two"), "*** ***");
    }

    #[test]
    fn non_ascii_text_and_masks() {
        let m = masker(&["clé"]);
        assert_eq!(m.mask("la clé: é"), "la ***: é");
    }

    #[test]
    fn cut_edges_hide_what_could_be_part_of_a_mask() {
        let m = masker(&["hunter2", "xy"]);
        // The piece ends in the middle of a secret...
        assert_eq!(m.mask_cut("pw=hunt", false, true), "pw=***");
        // ...and the next one starts with its rest.
        assert_eq!(m.mask_cut("er2 ok", true, false), "*** ok");
        // Uncut edges, or edges that match no mask, stay.
        assert_eq!(m.mask_cut("pw=hunt", false, false), "pw=hunt");
        assert_eq!(m.mask_cut("er2 ok", true, true), "*** ok");
        assert_eq!(m.mask_cut("y hunter2 x", true, true), "*** *** ***");
        assert_eq!(m.mask_cut("x hunter2 y", true, true), "x *** y");
    }

    #[test]
    fn debug_never_shows_values() {
        let m = masker(&["topsecret"]);
        assert!(!format!("{m:?}").contains("topsecret"));
    }
}
