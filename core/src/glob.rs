//! GitHub's filter patterns for `branches`, `tags` and `paths` (the "Filter pattern
//! cheat sheet" of *Workflow syntax for GitHub Actions*):
//!
//! - `*` any run of characters except `/`; `**` any run, `/` included; `**/` any
//!   number of leading directories, none included (`**/README.md` matches `README.md`).
//! - `?` zero or one, `+` one or more, of the preceding character or `[...]` set.
//! - `[...]` one character from a set; ranges `a-z`, `A-Z`, `0-9` only.
//! - `\` makes the next character literal; `!` at the very start negates the pattern.
//!
//! A pattern matches the whole subject. In a list, the last matching pattern decides
//! ("a matching negative pattern after a positive match will exclude the Git ref"; "a
//! matching positive pattern after a negative match will include the path again").
//! Common glob crates read `?` as "any one character", so this is hand-written.

/// A pattern that is not valid filter syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid filter pattern `{pattern}`: {reason}")]
pub struct PatternError {
    /// The pattern as written.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    negated: bool,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A character or set, with how many times it may repeat.
    Atom(Atom, Repeat),
    /// `*`
    Star,
    /// `**`
    DoubleStar,
    /// `**/`: empty, or any run ending in `/` (act's `(.+/)?`).
    Dirs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Atom {
    Char(char),
    Set(Vec<(char, char)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Once,
    ZeroOrOne,
    OneOrMore,
}

impl Atom {
    fn accepts(&self, c: char) -> bool {
        match self {
            Atom::Char(a) => *a == c,
            Atom::Set(ranges) => ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)),
        }
    }
}

impl Pattern {
    /// Compiles `text`; a leading `!` makes it a negative pattern.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let (negated, body) = match text.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let tokens = tokenize(body).map_err(|reason| PatternError {
            pattern: text.to_string(),
            reason,
        })?;
        Ok(Pattern {
            text: text.to_string(),
            negated,
            tokens,
        })
    }

    /// The pattern as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The pattern without its leading `!`.
    pub fn body(&self) -> &str {
        if self.negated {
            &self.text[1..]
        } else {
            &self.text
        }
    }

    /// Does it start with `!`?
    pub fn is_negated(&self) -> bool {
        self.negated
    }

    /// Does the pattern (ignoring its `!`) match the whole of `subject`?
    pub fn matches(&self, subject: &str) -> bool {
        let chars: Vec<char> = subject.chars().collect();
        Matcher::new(&self.tokens, &chars).run(0, 0)
    }
}

/// An ordered list of patterns, as under `branches:` or `paths:`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PatternList(Vec<Pattern>);

impl PatternList {
    /// Compiles every pattern; the first invalid one is the error.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<PatternList, PatternError> {
        patterns
            .iter()
            .map(|p| Pattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()
            .map(PatternList)
    }

    /// The patterns in order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.0
    }

    /// Is `subject` selected? The last pattern that matches decides: selected if it is
    /// positive, not if it is negative; selected by none if nothing matches.
    pub fn selects(&self, subject: &str) -> bool {
        self.selects_with(|p| p.matches(subject))
    }

    /// As [`PatternList::selects`], with the caller deciding whether a pattern matches
    /// (for refs, which may be written short or in full).
    pub fn selects_with(&self, matches: impl Fn(&Pattern) -> bool) -> bool {
        self.0
            .iter()
            .rev()
            .find(|p| matches(p))
            .is_some_and(|p| !p.negated)
    }
}

fn tokenize(body: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = body.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => i = star(&chars, i, &mut tokens),
            '?' | '+' => quantify(&mut tokens, c)?,
            '[' => {
                let (set, next) = set(&chars, i)?;
                tokens.push(Token::Atom(set, Repeat::Once));
                i = next;
            }
            '\\' => {
                let escaped = *chars
                    .get(i)
                    .ok_or("a trailing `\\` escapes nothing".to_string())?;
                tokens.push(Token::Atom(Atom::Char(escaped), Repeat::Once));
                i += 1;
            }
            other => tokens.push(Token::Atom(Atom::Char(other), Repeat::Once)),
        }
    }
    Ok(tokens)
}

/// After a `*` at `i - 1`: pushes `*`, `**` or `**/` and returns the next index.
fn star(chars: &[char], i: usize, tokens: &mut Vec<Token>) -> usize {
    if chars.get(i) != Some(&'*') {
        tokens.push(Token::Star);
        return i;
    }
    if chars.get(i + 1) == Some(&'/') {
        tokens.push(Token::Dirs);
        return i + 2;
    }
    tokens.push(Token::DoubleStar);
    i + 1
}

/// Applies `?` or `+` to the preceding character or set. At the very start there is
/// nothing to repeat and the character is literal, as in act.
fn quantify(tokens: &mut Vec<Token>, q: char) -> Result<(), String> {
    let repeat = if q == '?' {
        Repeat::ZeroOrOne
    } else {
        Repeat::OneOrMore
    };
    match tokens.last_mut() {
        None => tokens.push(Token::Atom(Atom::Char(q), Repeat::Once)),
        Some(Token::Atom(_, r @ Repeat::Once)) => *r = repeat,
        Some(_) => {
            return Err(format!(
                "`{q}` must follow a character or a `[...]` set (escape it as `\\{q}`)"
            ))
        }
    }
    Ok(())
}

/// Parses a set after its `[` (at `i - 1`); returns it and the index after `]`.
fn set(chars: &[char], mut i: usize) -> Result<(Atom, usize), String> {
    let mut ranges = Vec::new();
    loop {
        let c = match chars.get(i) {
            None => return Err("`[` has no closing `]`".into()),
            Some(']') if ranges.is_empty() => return Err("`[]` is an empty set".into()),
            Some(']') => return Ok((Atom::Set(ranges), i + 1)),
            Some('\\') => {
                i += 1;
                *chars.get(i).ok_or("`[` has no closing `]`")?
            }
            Some(c) => *c,
        };
        if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|c| *c != ']') {
            let hi = chars[i + 2];
            check_range(c, hi)?;
            ranges.push((c, hi));
            i += 3;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
}

/// "Ranges can only include `a-z`, `A-Z`, and `0-9`."
fn check_range(lo: char, hi: char) -> Result<(), String> {
    let same_class = [
        char::is_ascii_lowercase,
        char::is_ascii_uppercase,
        char::is_ascii_digit,
    ]
    .iter()
    .any(|class| class(&lo) && class(&hi));
    if same_class && lo <= hi {
        Ok(())
    } else {
        Err(format!(
            "range `{lo}-{hi}` is not within a-z, A-Z or 0-9 in ascending order"
        ))
    }
}

/// Whole-subject matching with memoised (token, position) states, so patterns with
/// many wildcards stay polynomial.
struct Matcher<'a> {
    tokens: &'a [Token],
    text: &'a [char],
    failed: Vec<bool>,
}

impl<'a> Matcher<'a> {
    fn new(tokens: &'a [Token], text: &'a [char]) -> Self {
        let failed = vec![false; (tokens.len() + 1) * (text.len() + 1)];
        Matcher {
            tokens,
            text,
            failed,
        }
    }

    fn run(&mut self, t: usize, pos: usize) -> bool {
        let slot = t * (self.text.len() + 1) + pos;
        if self.failed[slot] {
            return false;
        }
        let ok = self.step(t, pos);
        if !ok {
            self.failed[slot] = true;
        }
        ok
    }

    fn step(&mut self, t: usize, pos: usize) -> bool {
        let Some(token) = self.tokens.get(t) else {
            return pos == self.text.len();
        };
        let ends: Vec<usize> = match token {
            Token::Atom(atom, repeat) => self.atom_ends(atom, *repeat, pos),
            Token::Star => {
                let run = self.text[pos..].iter().take_while(|c| **c != '/').count();
                (pos..=pos + run).collect()
            }
            Token::DoubleStar => (pos..=self.text.len()).collect(),
            Token::Dirs => std::iter::once(pos)
                .chain((pos + 2..=self.text.len()).filter(|k| self.text[k - 1] == '/'))
                .collect(),
        };
        ends.into_iter().any(|end| self.run(t + 1, end))
    }

    /// The positions after matching `atom` at `pos` the allowed number of times.
    fn atom_ends(&self, atom: &Atom, repeat: Repeat, pos: usize) -> Vec<usize> {
        let run = self.text[pos..]
            .iter()
            .take_while(|c| atom.accepts(**c))
            .count();
        match repeat {
            Repeat::Once if run >= 1 => vec![pos + 1],
            Repeat::Once => vec![],
            Repeat::ZeroOrOne => (pos..=pos + run.min(1)).collect(),
            Repeat::OneOrMore => (pos + 1..=pos + run).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selects(patterns: &[&str], subject: &str) -> bool {
        PatternList::parse(patterns).unwrap().selects(subject)
    }

    /// "Patterns to match branches and tags", Filter pattern cheat sheet, Workflow
    /// syntax for GitHub Actions: every example match of every row.
    #[test]
    fn cheat_sheet_branches_and_tags() {
        for (pattern, subjects) in [
            (
                "feature/*",
                &["feature/my-branch", "feature/your-branch"][..],
            ),
            (
                "feature/**",
                &[
                    "feature/beta-a/my-branch",
                    "feature/your-branch",
                    "feature/mona/the/octocat",
                ],
            ),
            ("main", &["main"]),
            ("releases/mona-the-octocat", &["releases/mona-the-octocat"]),
            ("*", &["main", "releases"]),
            ("**", &["all/the/branches", "every/tag"]),
            ("*feature", &["mona-feature", "feature", "ver-10-feature"]),
            ("v2*", &["v2", "v2.0", "v2.9"]),
            ("v[12].[0-9]+.[0-9]+", &["v1.10.1", "v2.0.0"]),
        ] {
            for s in subjects {
                assert!(selects(&[pattern], s), "{pattern} should match {s}");
            }
        }
    }

    /// The same rows' descriptions, read for what they exclude.
    #[test]
    fn cheat_sheet_branches_and_tags_non_matches() {
        for (pattern, subject) in [
            ("feature/*", "feature/beta-a/my-branch"), // `*` does not match `/`
            ("*", "releases/v1"),                      // "names that don't contain a slash"
            ("main", "main2"),                         // exact name
            ("v2*", "v1.0"),                           // "start with v2"
            ("v[12].[0-9]+.[0-9]+", "v3.0.0"),         // major version 1 or 2
            ("v[12].[0-9]+.[0-9]+", "v1..0"),          // `+` needs one or more
        ] {
            assert!(
                !selects(&[pattern], subject),
                "{pattern} should not match {subject}"
            );
        }
    }

    /// "Patterns to match file paths", Filter pattern cheat sheet.
    #[test]
    fn cheat_sheet_paths() {
        for (patterns, subjects) in [
            (&["*"][..], &["README.md", "server.rb"][..]),
            (&["*.jsx?"], &["page.js", "page.jsx"]),
            (&["**"], &["all/the/files.md"]),
            (&["*.js"], &["app.js", "index.js"]),
            (&["**.js"], &["index.js", "js/index.js", "src/js/app.js"]),
            (&["docs/*"], &["docs/README.md", "docs/file.txt"]),
            (&["docs/**"], &["docs/README.md", "docs/mona/octocat.txt"]),
            (
                &["docs/**/*.md"],
                &[
                    "docs/README.md",
                    "docs/mona/hello-world.md",
                    "docs/a/markdown/file.md",
                ],
            ),
            (
                &["**/docs/**"],
                &[
                    "docs/hello.md",
                    "dir/docs/my-file.txt",
                    "space/docs/plan/space.doc",
                ],
            ),
            (&["**/README.md"], &["README.md", "js/README.md"]),
            (&["**/*src/**"], &["a/src/app.js", "my-src/code/js/app.js"]),
            (&["**/*-post.md"], &["my-post.md", "path/their-post.md"]),
            (
                &["**/migrate-*.sql"],
                &[
                    "migrate-10909.sql",
                    "db/migrate-v1.0.sql",
                    "db/sept/migrate-v1.sql",
                ],
            ),
            (&["*.md", "!README.md"], &["hello.md"]),
            (
                &["*.md", "!README.md", "README*"],
                &["hello.md", "README.md", "README.doc"],
            ),
        ] {
            for s in subjects {
                assert!(selects(patterns, s), "{patterns:?} should match {s}");
            }
        }
    }

    /// The cheat sheet's "Does not match" column and the descriptions' limits.
    #[test]
    fn cheat_sheet_paths_non_matches() {
        for (patterns, subject) in [
            (&["*.md", "!README.md"][..], "README.md"), // negated later
            (&["*.md", "!README.md"], "docs/hello.md"), // `*` does not match `/`
            (&["*.js"], "src/app.js"),                  // root only
            (&["*.jsx?"], "page.jsxx"),                 // zero or one `x`
            (&["docs/*"], "docs/mona/octocat.txt"),     // root of docs only
            (&["**/README.md"], "js/README.mdx"),       // whole path
        ] {
            assert!(
                !selects(patterns, subject),
                "{patterns:?} should not match {subject}"
            );
        }
    }

    #[test]
    fn escapes_make_special_characters_literal() {
        assert!(selects(&["release\\+1"], "release+1"));
        assert!(!selects(&["release+1"], "release+1"));
        assert!(selects(&["release+1"], "releaseee1"));
        assert!(selects(&["\\!file"], "!file"));
        assert!(selects(&["a\\*b"], "a*b"));
        assert!(!selects(&["a\\*b"], "axb"));
        assert!(selects(&["[\\]x]"], "]"));
    }

    #[test]
    fn quantifiers_apply_to_sets_and_a_leading_one_is_literal() {
        assert!(selects(&["v[0-9]+"], "v2024"));
        assert!(!selects(&["v[0-9]+"], "v"));
        assert!(selects(&["x[ab]?y"], "xy"));
        assert!(selects(&["x[ab]?y"], "xby"));
        assert!(!selects(&["x[ab]?y"], "xaby"));
        assert!(selects(&["+x"], "+x"));
        assert!(!selects(&["[a-c]"], "d"));
        assert!(selects(&["[CB]at"], "Cat"));
        assert!(selects(&["[1-2]00"], "200"));
    }

    #[test]
    fn a_negative_pattern_alone_selects_nothing() {
        assert!(!selects(&["!main"], "main"));
        assert!(!selects(&["!main"], "dev"));
        assert!(!selects(&[] as &[&str], "dev"));
    }

    #[test]
    fn invalid_patterns_are_errors_that_name_the_pattern() {
        for (pattern, needle) in [
            ("v[0-9", "no closing"),
            ("a[]", "empty set"),
            ("x\\", "trailing"),
            ("a*+", "must follow"),
            ("a??", "must follow"),
            ("[a-Z]", "range"),
            ("[9-0]", "range"),
        ] {
            let err = Pattern::parse(pattern).unwrap_err();
            assert_eq!(err.pattern, pattern);
            assert!(err.to_string().contains(needle), "{pattern}: {err}");
        }
    }

    #[test]
    fn many_wildcards_do_not_explode() {
        let subject = "a".repeat(200) + "b";
        assert!(!selects(&["**a**a**a**a**a**a**a**c"], &subject));
    }

    #[test]
    fn body_strips_the_negation_only() {
        let p = Pattern::parse("!refs/heads/x").unwrap();
        assert!(p.is_negated());
        assert_eq!(p.body(), "refs/heads/x");
        assert_eq!(p.text(), "!refs/heads/x");
    }
}
