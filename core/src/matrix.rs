//! The legs of a matrix job: `strategy.matrix` expanded as GitHub does.
//!
//! Sources: GitHub's *Running variations of jobs in a workflow* (order, exclude,
//! include, include-only, the 256-job limit) and, where the docs are silent, GitHub's
//! own workflow parser as published in actions/runner
//! (`src/Sdk/WorkflowParser/Conversion/MatrixBuilder.cs`, `JobNameBuilder.cs`,
//! `WorkflowTemplateConverter.cs`):
//!
//! - Legs are the cartesian product of the vectors, the first key varying slowest.
//! - An `exclude` or `include` entry is split into filter pairs (keys that are vectors)
//!   and, for `include`, extra pairs (other keys). A filter matches a combination when
//!   every *leaf* of it equals the combination's value at the same path, compared with
//!   the expression language's `==` (`matrix.os == 'ubuntu'`): strings case-insensitively,
//!   and numbers, strings, booleans and null loosely (`'12' == 12`). So nested objects
//!   match partially, leaf by leaf.
//! - Excludes apply first. Then every include entry whose filter matches a combination
//!   adds its extra pairs to it, later entries overwriting earlier extras; the vectors'
//!   values are never overwritten, since those keys are the filter. An entry that
//!   matched no combination becomes a leg of its own (filter pairs, then extras).
//! - Vector and include keys are case-insensitive ("`OS` and `os` will be treated as the
//!   same variable"); `include` and `exclude` themselves are matched exactly, as
//!   GitHub's parser does.

use std::collections::BTreeMap;

use crate::value::{Object, Value};

/// "A matrix will generate a maximum of 256 jobs per workflow run."
pub const MAX_LEGS: usize = 256;

/// The most combinations udos enumerates before excludes (a guard against a matrix
/// whose product cannot be walked; GitHub bounds it by its template memory instead).
pub const MAX_PRODUCT: u128 = 65_536;

/// One leg: the `matrix` context of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Leg {
    /// The matrix values, keys in order: the vectors, then values added by `include`.
    pub values: Object,
    /// How many leading keys of `values` GitHub's display name shows: the vectors for a
    /// combination (values added by `include` are not shown), all keys for a leg made
    /// from an `include` entry that matched no combination.
    pub shown: usize,
}

/// A `strategy.matrix` that cannot be expanded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MatrixError {
    /// The matrix is not a mapping.
    #[error("strategy.matrix must be a mapping, not {0}")]
    NotAMapping(String),
    /// A vector that is not an array.
    #[error("strategy.matrix.{0} must be a list of values")]
    NotAList(String),
    /// A vector with no values.
    #[error("strategy.matrix.{0} does not contain any values")]
    EmptyVector(String),
    /// Neither vectors nor include entries.
    #[error("strategy.matrix must define at least one vector")]
    NoVector,
    /// `include` or `exclude` that is not a list.
    #[error("strategy.matrix.{0} must be a list of mappings")]
    NotAListOfMappings(&'static str),
    /// An `include`/`exclude` entry that is not a non-empty mapping.
    #[error("strategy.matrix.{list}[{index}] must be a mapping with at least one key")]
    BadEntry {
        /// `include` or `exclude`.
        list: &'static str,
        /// Its position, from 0.
        index: usize,
    },
    /// An `exclude` key that is not a vector.
    #[error("strategy.matrix.exclude[{index}]: `{key}` does not match any key within the matrix")]
    UnknownExcludeKey {
        /// The entry's position, from 0.
        index: usize,
        /// The key.
        key: String,
    },
    /// More legs than GitHub allows.
    #[error("strategy.matrix makes {0} jobs; GitHub allows at most {MAX_LEGS}")]
    TooManyLegs(usize),
    /// A product too large to walk.
    #[error(
        "strategy.matrix has {0} combinations before exclude; udos expands at most {MAX_PRODUCT}"
    )]
    ProductTooLarge(u128),
}

/// An `include` entry, split GitHub's way.
struct Include {
    filter: Vec<(String, Value)>,
    extra: Vec<(String, Value)>,
    matched: bool,
}

/// Expands an evaluated `strategy.matrix` into its legs, in GitHub's order.
pub fn expand(matrix: &Value) -> Result<Vec<Leg>, MatrixError> {
    let Value::Object(matrix) = matrix else {
        return Err(MatrixError::NotAMapping(kind(matrix).into()));
    };
    let vectors = vectors(matrix)?;
    let excludes = excludes(matrix, &vectors)?;
    let mut includes = includes(matrix, &vectors)?;
    if vectors.is_empty() && includes.is_empty() {
        return Err(MatrixError::NoVector);
    }
    let product = product_size(&vectors)?;
    let mut legs = Vec::new();
    for index in 0..product {
        let combination = combination(&vectors, index);
        if excludes.iter().any(|e| filter_matches(e, &combination)) {
            continue;
        }
        legs.push(add_extras(combination, &mut includes));
        check_count(legs.len())?;
    }
    for include in includes.iter().filter(|i| !i.matched) {
        let values: Object = include
            .filter
            .iter()
            .chain(&include.extra)
            .cloned()
            .collect();
        let shown = values.len();
        legs.push(Leg { values, shown });
        check_count(legs.len())?;
    }
    Ok(legs)
}

/// Keeps the legs selected by act-style `--matrix key:value` picks: for every picked
/// key, the leg's value, in its string form, must equal one of the values picked for
/// that key. A leg without a picked key is dropped (act would keep it).
pub fn filter(legs: Vec<Leg>, picks: &[(String, String)]) -> Vec<Leg> {
    let mut wanted: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (key, value) in picks {
        wanted
            .entry(key.to_ascii_lowercase())
            .or_default()
            .push(value);
    }
    legs.into_iter()
        .filter(|leg| {
            wanted.iter().all(|(key, values)| {
                leg.values
                    .get(key)
                    .is_some_and(|v| values.contains(&v.to_string().as_str()))
            })
        })
        .collect()
}

/// GitHub's display name of a leg: `test (ubuntu, 18)`. The shown values' scalar
/// leaves, depth first (nested objects and arrays contribute their leaves; null and
/// empty strings nothing), numbers as .NET's `G15`; cut to 100 characters with `...`.
pub fn leg_name(job_name: &str, leg: &Leg) -> String {
    if job_name.is_empty() {
        return String::new();
    }
    let mut segments = Vec::new();
    for value in leg.values.values().take(leg.shown) {
        leaves(value, &mut segments);
    }
    let name = if segments.is_empty() {
        job_name.to_string()
    } else {
        format!("{job_name} ({})", segments.join(", "))
    };
    truncate(name)
}

const MAX_NAME: usize = 100;

fn truncate(name: String) -> String {
    if name.chars().count() <= MAX_NAME {
        return name;
    }
    let mut cut: String = name.chars().take(MAX_NAME - 3).collect();
    cut.push_str("...");
    cut
}

fn leaves(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Null => {}
        Value::Bool(b) => out.push(b.to_string()),
        Value::Number(n) => out.push(format_g15(*n)),
        Value::String(s) if s.is_empty() => {}
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
        Value::Object(o) => o.values().for_each(|v| leaves(v, out)),
    }
}

/// .NET's `double.ToString("G15", InvariantCulture)`, which GitHub's job names use:
/// 15 significant digits, fixed notation for decimal exponents -5 < e < 15, else
/// `d.ddE+XX`.
fn format_g15(n: f64) -> String {
    if n.is_nan() {
        return "NaN".into();
    }
    if n.is_infinite() {
        return if n > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if n == 0.0 {
        return if n.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{n:.14e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp > -5 && exp < 15 {
        let rounded: f64 = sci.parse().unwrap_or(n);
        return format!("{rounded}");
    }
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}E{sign}{:02}", exp.abs())
}

fn check_count(count: usize) -> Result<(), MatrixError> {
    if count > MAX_LEGS {
        Err(MatrixError::TooManyLegs(count))
    } else {
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// The vectors, in order.
fn vectors(matrix: &Object) -> Result<Vec<(String, &[Value])>, MatrixError> {
    matrix
        .iter()
        .filter(|(k, _)| *k != "include" && *k != "exclude")
        .map(|(k, v)| match v {
            Value::Array(a) if a.is_empty() => Err(MatrixError::EmptyVector(k.clone())),
            Value::Array(a) => Ok((k.clone(), a.as_slice())),
            _ => Err(MatrixError::NotAList(k.clone())),
        })
        .collect()
}

/// The entries of `include` or `exclude`, each a non-empty mapping.
fn entries<'a>(matrix: &'a Object, list: &'static str) -> Result<Vec<&'a Object>, MatrixError> {
    let Some((_, value)) = matrix.iter().find(|(k, _)| *k == list) else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = value else {
        return Err(MatrixError::NotAListOfMappings(list));
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::Object(o) if !o.is_empty() => Ok(o),
            _ => Err(MatrixError::BadEntry { list, index }),
        })
        .collect()
}

fn is_vector(vectors: &[(String, &[Value])], key: &str) -> bool {
    vectors.iter().any(|(k, _)| k.eq_ignore_ascii_case(key))
}

fn excludes(
    matrix: &Object,
    vectors: &[(String, &[Value])],
) -> Result<Vec<Vec<(String, Value)>>, MatrixError> {
    let entries = entries(matrix, "exclude")?;
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            if let Some(key) = entry.keys().find(|k| !is_vector(vectors, k)) {
                return Err(MatrixError::UnknownExcludeKey {
                    index,
                    key: key.clone(),
                });
            }
            Ok(entry.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        })
        .collect()
}

fn includes(matrix: &Object, vectors: &[(String, &[Value])]) -> Result<Vec<Include>, MatrixError> {
    Ok(entries(matrix, "include")?
        .into_iter()
        .map(|entry| {
            let (filter, extra) = entry
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .partition(|(k, _)| is_vector(vectors, k));
            Include {
                filter,
                extra,
                matched: false,
            }
        })
        .collect())
}

/// The product's size; none without vectors (then only includes make legs).
fn product_size(vectors: &[(String, &[Value])]) -> Result<usize, MatrixError> {
    if vectors.is_empty() {
        return Ok(0);
    }
    let size = vectors
        .iter()
        .fold(1u128, |acc, (_, v)| acc.saturating_mul(v.len() as u128));
    if size > MAX_PRODUCT {
        return Err(MatrixError::ProductTooLarge(size));
    }
    Ok(size as usize)
}

/// Combination number `index` of the product, the first vector varying slowest.
fn combination(vectors: &[(String, &[Value])], mut index: usize) -> Object {
    let mut picked = Vec::with_capacity(vectors.len());
    for (key, values) in vectors.iter().rev() {
        picked.push((key.clone(), values[index % values.len()].clone()));
        index /= values.len();
    }
    picked.into_iter().rev().collect()
}

/// Applies every matching include entry's extras to one combination.
fn add_extras(combination: Object, includes: &mut [Include]) -> Leg {
    let mut values = combination.clone();
    for include in includes.iter_mut() {
        if filter_matches(&include.filter, &combination) {
            include.matched = true;
            for (k, v) in &include.extra {
                values.insert(k.clone(), v.clone());
            }
        }
    }
    Leg {
        shown: combination.len(),
        values,
    }
}

fn filter_matches(filter: &[(String, Value)], combination: &Object) -> bool {
    filter
        .iter()
        .all(|(k, want)| leaf_match(combination.get(k), want))
}

/// Every leaf of `want` equals the value at the same path in `actual` (a missing path
/// reads as null, as in an expression).
fn leaf_match(actual: Option<&Value>, want: &Value) -> bool {
    match want {
        Value::Object(o) => o
            .iter()
            .all(|(k, w)| leaf_match(actual.and_then(|a| a.get(k)), w)),
        Value::Array(items) => items.iter().enumerate().all(|(i, w)| {
            let item = match actual {
                Some(Value::Array(a)) => a.get(i),
                _ => None,
            };
            leaf_match(item, w)
        }),
        scalar => loose_eq(actual.unwrap_or(&Value::Null), scalar),
    }
}

/// The expression language's `==` (actions/runner `EvaluationResult.AbstractEqual`):
/// JavaScript's abstract equality, except that strings compare case-insensitively and
/// objects and arrays equal nothing but themselves (never a leaf here).
fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Number(x), Value::Number(y)) => x == y,
        (Value::String(x), Value::String(y)) => eq_ignore_case(x, y),
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::String(s)) | (Value::String(s), Value::Number(x)) => {
            *x == to_number(s)
        }
        (Value::Bool(_) | Value::Null, other) => loose_eq(&Value::Number(scalar_number(a)), other),
        (other, Value::Bool(_) | Value::Null) => loose_eq(other, &Value::Number(scalar_number(b))),
        _ => false,
    }
}

fn scalar_number(v: &Value) -> f64 {
    match v {
        Value::Bool(true) => 1.0,
        Value::Bool(false) | Value::Null => 0.0,
        Value::Number(n) => *n,
        Value::String(s) => to_number(s),
        Value::Array(_) | Value::Object(_) => f64::NAN,
    }
}

/// JavaScript's `Number(string)` as the runner implements it: blank is 0, decimal with
/// exponent, `0x` hex, `0o` octal, anything else NaN.
fn to_number(s: &str) -> f64 {
    let t = s.trim();
    if t.is_empty() {
        return 0.0;
    }
    let radix = |digits: &str, base| {
        i32::from_str_radix(digits, base)
            .ok()
            .filter(|_| !digits.starts_with(['+', '-']))
            .map_or(f64::NAN, f64::from)
    };
    if let Some(hex) = t.strip_prefix("0x") {
        return radix(hex, 16);
    }
    if let Some(oct) = t.strip_prefix("0o") {
        return radix(oct, 8);
    }
    let decimal = t
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    if decimal {
        t.parse().unwrap_or(f64::NAN)
    } else {
        f64::NAN
    }
}

/// .NET's `OrdinalIgnoreCase`: characters compared by their upper-case forms.
fn eq_ignore_case(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_uppercase)
        .eq(b.chars().flat_map(char::to_uppercase))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A matrix from YAML, read by the YAML parser the workflow model uses.
    fn yaml(text: &str) -> Value {
        yaml_serde::from_str(text).expect("YAML")
    }

    fn legs(text: &str) -> Vec<Leg> {
        expand(&yaml(text)).expect("a valid matrix")
    }

    /// Each leg as `{k: v, ...}` in the docs' notation.
    fn shapes(legs: &[Leg]) -> Vec<String> {
        legs.iter()
            .map(|leg| {
                let pairs: Vec<String> = leg
                    .values
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                format!("{{{}}}", pairs.join(", "))
            })
            .collect()
    }

    /// *Running variations of jobs*: "the above matrix will create the jobs in the
    /// following order" (the first variable varies slowest).
    #[test]
    fn docs_order_of_a_two_variable_matrix() {
        let legs = legs("{version: [10, 12, 14], os: [ubuntu-latest, windows-latest]}");
        assert_eq!(
            shapes(&legs),
            [
                "{version: 10, os: ubuntu-latest}",
                "{version: 10, os: windows-latest}",
                "{version: 12, os: ubuntu-latest}",
                "{version: 12, os: windows-latest}",
                "{version: 14, os: ubuntu-latest}",
                "{version: 14, os: windows-latest}",
            ]
        );
    }

    /// The docs' include example (fruit, animal, color, shape) and its six legs.
    #[test]
    fn docs_include_fruit_animal_color_shape() {
        let legs = legs(
            "
fruit: [apple, pear]
animal: [cat, dog]
include:
  - color: green
  - color: pink
    animal: cat
  - fruit: apple
    shape: circle
  - fruit: banana
  - fruit: banana
    animal: cat
",
        );
        assert_eq!(
            shapes(&legs),
            [
                "{fruit: apple, animal: cat, color: pink, shape: circle}",
                "{fruit: apple, animal: dog, color: green, shape: circle}",
                "{fruit: pear, animal: cat, color: pink}",
                "{fruit: pear, animal: dog, color: green}",
                "{fruit: banana}",
                "{fruit: banana, animal: cat}",
            ]
        );
    }

    /// "Example: Expanding configurations": npm 6 joins only windows/node 16.
    #[test]
    fn docs_include_expands_one_configuration() {
        let legs = legs(
            "
os: [windows-latest, ubuntu-latest]
node: [14, 16]
include:
  - os: windows-latest
    node: 16
    npm: 6
",
        );
        assert_eq!(
            shapes(&legs),
            [
                "{os: windows-latest, node: 14}",
                "{os: windows-latest, node: 16, npm: 6}",
                "{os: ubuntu-latest, node: 14}",
                "{os: ubuntu-latest, node: 16}",
            ]
        );
    }

    /// "Example: Adding configurations": "this matrix will run 10 jobs".
    #[test]
    fn docs_include_adds_a_configuration() {
        let legs = legs(
            "
os: [macos-latest, windows-latest, ubuntu-latest]
version: [12, 14, 16]
include:
  - os: windows-latest
    version: 17
",
        );
        assert_eq!(legs.len(), 10);
        assert_eq!(shapes(&legs[9..]), ["{os: windows-latest, version: 17}"]);
    }

    /// "If you don't specify any matrix variables, all configurations under include
    /// will run" (the `includes_only` example).
    #[test]
    fn docs_include_only_matrix() {
        let legs = legs(
            "
include:
  - site: production
    datacenter: site-a
  - site: staging
    datacenter: site-b
",
        );
        assert_eq!(
            shapes(&legs),
            [
                "{site: production, datacenter: site-a}",
                "{site: staging, datacenter: site-b}",
            ]
        );
        assert_eq!(
            leg_name("includes_only", &legs[1]),
            "includes_only (staging, site-b)"
        );
    }

    /// "Excluding matrix configurations": "An excluded configuration only has to be a
    /// partial match ... the following workflow will run nine jobs".
    #[test]
    fn docs_exclude_partial_matches() {
        let legs = legs(
            "
os: [macos-latest, windows-latest]
version: [12, 14, 16]
environment: [staging, production]
exclude:
  - os: macos-latest
    version: 12
    environment: production
  - os: windows-latest
    version: 16
",
        );
        assert_eq!(legs.len(), 9);
        let shapes = shapes(&legs);
        assert!(
            !shapes.contains(&"{os: macos-latest, version: 12, environment: production}".into())
        );
        assert!(!shapes
            .iter()
            .any(|s| s.starts_with("{os: windows-latest, version: 16")));
    }

    /// Excludes apply before includes: an include matching only an excluded
    /// combination becomes a leg of its own (MatrixBuilder.Build).
    #[test]
    fn excludes_apply_before_includes() {
        let legs = legs(
            "
os: [linux, windows]
exclude:
  - os: windows
include:
  - os: windows
    arch: arm64
",
        );
        assert_eq!(shapes(&legs), ["{os: linux}", "{os: windows, arch: arm64}"]);
    }

    /// Equality is the expression language's `==`: case-insensitive strings, loose
    /// number/string comparison (MatrixBuilder builds `matrix.os == 'UBUNTU'`).
    #[test]
    fn filters_compare_like_the_expression_language() {
        let legs = legs(
            "
os: [ubuntu, windows]
node: [12, 14]
exclude:
  - os: UBUNTU
    node: '12'
include:
  - os: Windows
    node: 14.0
    big: true
",
        );
        assert_eq!(
            shapes(&legs),
            [
                "{os: ubuntu, node: 14}",
                "{os: windows, node: 12}",
                "{os: windows, node: 14, big: true}",
            ]
        );
        for (a, b, eq) in [
            (Value::str("abc"), Value::str("ABC"), true),
            (Value::Number(1.0), Value::str(" 1 "), true),
            (Value::Number(255.0), Value::str("0xff"), true),
            (Value::Bool(true), Value::Number(1.0), true),
            (Value::Null, Value::Number(0.0), true),
            (Value::Null, Value::str(""), true),
            (Value::Bool(false), Value::str("false"), false),
            (Value::Number(f64::NAN), Value::Number(f64::NAN), false),
            (Value::Array(vec![]), Value::Bool(false), false),
        ] {
            assert_eq!(loose_eq(&a, &b), eq, "{a:?} == {b:?}");
        }
    }

    /// Nested values match leaf by leaf, so partially.
    #[test]
    fn nested_filters_match_partially() {
        let legs = legs(
            "
versions:
  - {node: 12, npm: 6}
  - {node: 14, npm: 7}
os: [a]
exclude:
  - versions: {node: 12}
",
        );
        assert_eq!(legs.len(), 1);
        assert_eq!(
            legs[0].values.get("versions").and_then(|v| v.get("node")),
            Some(&Value::Number(14.0))
        );
    }

    #[test]
    fn keys_are_case_insensitive_for_filters() {
        let legs = legs("{OS: [a, b], include: [{os: a, x: 1}], exclude: [{Os: b}]}");
        assert_eq!(shapes(&legs), ["{OS: a, x: 1}"]);
    }

    #[test]
    fn invalid_matrices_are_errors_naming_the_key() {
        for (text, err) in [
            ("[1, 2]", MatrixError::NotAMapping("a list".into())),
            ("{os: ubuntu}", MatrixError::NotAList("os".into())),
            ("{os: []}", MatrixError::EmptyVector("os".into())),
            ("{}", MatrixError::NoVector),
            ("{include: []}", MatrixError::NoVector),
            (
                "{os: [a], include: {os: a}}",
                MatrixError::NotAListOfMappings("include"),
            ),
            (
                "{os: [a], include: [{}]}",
                MatrixError::BadEntry {
                    list: "include",
                    index: 0,
                },
            ),
            (
                "{os: [a], exclude: [{os: a}, 3]}",
                MatrixError::BadEntry {
                    list: "exclude",
                    index: 1,
                },
            ),
            (
                "{os: [a], exclude: [{arch: x}]}",
                MatrixError::UnknownExcludeKey {
                    index: 0,
                    key: "arch".into(),
                },
            ),
        ] {
            assert_eq!(expand(&yaml(text)), Err(err), "{text}");
        }
        assert_eq!(
            MatrixError::EmptyVector("os".into()).to_string(),
            "strategy.matrix.os does not contain any values"
        );
    }

    /// "A matrix will generate a maximum of 256 jobs per workflow run"; excludes count.
    #[test]
    fn more_than_256_legs_is_an_error() {
        let sixteen: Vec<Value> = (0..16).map(|n| Value::Number(n as f64)).collect();
        let mut m = Object::new();
        m.insert("a", Value::Array(sixteen.clone()));
        m.insert("b", Value::Array(sixteen.clone()));
        assert_eq!(expand(&Value::Object(m.clone())).map(|l| l.len()), Ok(256));
        m.insert("include", yaml("[{a: 99}]"));
        assert_eq!(
            expand(&Value::Object(m.clone())),
            Err(MatrixError::TooManyLegs(257))
        );
        m.insert("exclude", yaml("[{a: 0, b: 0}]"));
        assert_eq!(expand(&Value::Object(m.clone())).map(|l| l.len()), Ok(256));
        m.insert("c", Value::Array(sixteen.clone()));
        m.insert("d", Value::Array(sixteen));
        m.insert("e", yaml("[x, y]"));
        assert_eq!(
            expand(&Value::Object(m)),
            Err(MatrixError::ProductTooLarge(16 * 16 * 16 * 16 * 2))
        );
    }

    #[test]
    fn excluding_everything_is_allowed() {
        assert_eq!(legs("{os: [a, b], exclude: [{os: a}, {os: b}]}"), vec![]);
    }

    #[test]
    fn names_show_vector_values_not_include_extras() {
        let legs = legs("{os: [ubuntu], node: [18], include: [{os: ubuntu, experimental: true}]}");
        assert_eq!(leg_name("test", &legs[0]), "test (ubuntu, 18)");
        assert_eq!(legs[0].values.get("experimental"), Some(&Value::Bool(true)));
    }

    #[test]
    fn names_flatten_nested_values_and_skip_empty_ones() {
        let legs = legs(
            "
cfg:
  - {os: linux, flags: [a, '', b], n: null}
empty: ['']
x: [1.5, 1e21, 0.1, 0.00001, false]
",
        );
        let names: Vec<String> = legs.iter().map(|l| leg_name("build", l)).collect();
        assert_eq!(
            names,
            [
                "build (linux, a, b, 1.5)",
                "build (linux, a, b, 1E+21)",
                "build (linux, a, b, 0.1)",
                "build (linux, a, b, 1E-05)",
                "build (linux, a, b, false)",
            ]
        );
        assert_eq!(leg_name("", &legs[0]), "");
        assert_eq!(
            leg_name(
                "plain",
                &Leg {
                    values: Object::new(),
                    shown: 0
                }
            ),
            "plain"
        );
    }

    #[test]
    fn long_names_are_cut_to_100_characters() {
        let long = "x".repeat(120);
        let legs = legs(&format!("{{v: [{long}]}}"));
        let name = leg_name("job", &legs[0]);
        assert_eq!(name.chars().count(), 100);
        assert!(name.starts_with("job (xxx") && name.ends_with("x..."));
    }

    #[test]
    fn g15_matches_dotnet() {
        for (n, s) in [
            (18.0, "18"),
            (-2.5, "-2.5"),
            (0.1 + 0.2, "0.3"),
            (123456789012345.0, "123456789012345"),
            (1234567890123456.0, "1.23456789012346E+15"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5E-07"),
            (1e100, "1E+100"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(format_g15(n), s, "{n}");
        }
    }

    #[test]
    fn filter_keeps_legs_matching_every_picked_key() {
        let all = legs("{os: [ubuntu, windows, macos], node: [16, 18], include: [{site: x}]}");
        let picks = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let kept = filter(all.clone(), &picks(&[("os", "ubuntu"), ("node", "18")]));
        assert_eq!(shapes(&kept), ["{os: ubuntu, node: 18, site: x}"]);
        let kept = filter(all.clone(), &picks(&[("os", "ubuntu"), ("os", "macos")]));
        assert_eq!(kept.len(), 4);
        assert!(kept
            .iter()
            .all(|l| l.values.get("os") != Some(&Value::str("windows"))));
        assert!(filter(all.clone(), &picks(&[("arch", "x64")])).is_empty());
        assert_eq!(filter(all.clone(), &[]).len(), all.len());
        assert!(filter(all, &picks(&[("os", "Ubuntu")])).is_empty());
    }

    /// A matrix of 1..=4 vectors `k0..`, each of 1..=4 scalar values.
    fn vectors_strategy() -> impl Strategy<Value = Vec<Vec<Value>>> {
        let scalar = prop_oneof![
            "[a-z]{1,6}".prop_map(Value::String),
            (0u8..50).prop_map(|n| Value::Number(n.into())),
            any::<bool>().prop_map(Value::Bool),
        ];
        prop::collection::vec(prop::collection::vec(scalar, 1..=4), 1..=4)
    }

    fn matrix_of(vectors: &[Vec<Value>]) -> Object {
        vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("k{i}"), Value::Array(v.clone())))
            .collect()
    }

    proptest! {
        #[test]
        fn product_size_and_every_key(vectors in vectors_strategy()) {
            let legs = expand(&Value::Object(matrix_of(&vectors))).unwrap();
            let product: usize = vectors.iter().map(Vec::len).product();
            prop_assert_eq!(legs.len(), product);
            for leg in &legs {
                prop_assert_eq!(leg.values.len(), vectors.len());
                for i in 0..vectors.len() {
                    let key = format!("k{i}");
                    prop_assert!(leg.values.get(&key).is_some(), "leg lacks {}", key);
                }
            }
        }

        #[test]
        fn excluding_every_first_value_leaves_nothing(vectors in vectors_strategy()) {
            let mut m = matrix_of(&vectors);
            let excludes = vectors[0]
                .iter()
                .map(|v| Value::Object([("k0".to_string(), v.clone())].into_iter().collect()))
                .collect();
            m.insert("exclude", Value::Array(excludes));
            prop_assert_eq!(expand(&Value::Object(m)).unwrap(), vec![]);
        }

        #[test]
        fn an_include_of_new_keys_joins_every_leg(
            vectors in vectors_strategy(),
            extra in "[a-z]{1,6}",
        ) {
            let plain = expand(&Value::Object(matrix_of(&vectors))).unwrap();
            let mut m = matrix_of(&vectors);
            let entry: Object = [("new".to_string(), Value::str(&extra))].into_iter().collect();
            m.insert("include", Value::Array(vec![Value::Object(entry)]));
            let legs = expand(&Value::Object(m)).unwrap();
            prop_assert_eq!(legs.len(), plain.len());
            for (leg, before) in legs.iter().zip(&plain) {
                prop_assert_eq!(leg.values.get("new"), Some(&Value::str(&extra)));
                prop_assert_eq!(leg.values.len(), before.values.len() + 1);
                prop_assert_eq!(leg.shown, before.shown);
            }
        }
    }
}
