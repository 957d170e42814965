//! Replays GitHub's own expression test suite against [`evaluate`].
//!
//! The cases are actions/languageservices' `expressions/testdata`, as the
//! `github-actions-expressions` crate ships them in its `tests/testdata` (MIT). They are
//! read from the crate's source in cargo's registry, not copied here; the test fails,
//! saying so, when that source cannot be found.

use std::path::{Path, PathBuf};

use super::*;

/// The parser version whose test data we replay (see Cargo.lock).
const CRATE_DIR: &str = "github-actions-expressions-1.32.0";

/// Where we knowingly differ from GitHub: (file, group, expression prefix, why). Each
/// entry must still explain at least one failing case, so the list cannot go stale.
const KNOWN_DIFFERENCES: &[(&str, &str, &str, &str)] = &[
    (
        "basic.json",
        "empty_expression",
        "",
        "the parser rejects an empty expression, which languageservices reads as null",
    ),
    (
        "syntax-errors.json",
        "depth-errors",
        "foo._1._2",
        "GitHub counts each access of a chain toward its depth limit of 50; the parser \
         limits only nested productions",
    ),
    (
        "syntax-errors.json",
        "depth-errors",
        "foo   .*.*",
        "as above",
    ),
    (
        "syntax-errors.json",
        "depth-errors",
        "foo[1][2]",
        "as above",
    ),
    (
        "syntax-errors.json",
        "depth-errors",
        "foo   [*][*]",
        "as above",
    ),
    (
        "syntax-errors.json",
        "memory-errors",
        "startswith(format(",
        "no limit on the memory an evaluation uses",
    ),
];

#[derive(Debug)]
struct Case {
    file: String,
    group: String,
    expr: String,
    contexts: Object,
    expected: Result<Value, String>,
}

#[test]
fn upstream_expression_suite() {
    let dir = testdata_dir();
    let cases = load_cases(&dir);
    assert!(
        cases.len() > 500,
        "only {} cases in {}",
        cases.len(),
        dir.display()
    );
    let status = Status {
        success: true,
        failure: false,
        cancelled: false,
    };
    let mut failures = Vec::new();
    let mut explained = vec![false; KNOWN_DIFFERENCES.len()];
    for case in &cases {
        let env = EvalEnv {
            contexts: &case.contexts,
            status,
            hash_files: None,
        };
        let got = evaluate(&case.expr, &env);
        if matches(&got, &case.expected) {
            continue;
        }
        match known_difference(case) {
            Some(i) => explained[i] = true,
            None => failures.push(format!(
                "{}::{} `{}`: expected {:?}, got {:?}",
                case.file, case.group, case.expr, case.expected, got
            )),
        }
    }
    for (entry, used) in KNOWN_DIFFERENCES.iter().zip(&explained) {
        assert!(
            used,
            "known difference {entry:?} no longer differs: remove it"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} upstream cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn matches(got: &Result<Value, ExprError>, expected: &Result<Value, String>) -> bool {
    match (got, expected) {
        (Ok(g), Ok(e)) => same(g, e),
        (Err(_), Err(_)) => true,
        _ => false,
    }
}

/// Structural equality, with NaN equal to NaN (a NaN result is a NaN expectation).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        _ => a == b,
    }
}

fn known_difference(case: &Case) -> Option<usize> {
    KNOWN_DIFFERENCES
        .iter()
        .position(|(f, g, e, _)| *f == case.file && *g == case.group && case.expr.starts_with(e))
}

/// `$CARGO_HOME/registry/src/*/github-actions-expressions-<v>/tests/testdata`.
fn testdata_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let src = cargo_home.join("registry/src");
    let found = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .flatten()
        .map(|index| index.path().join(CRATE_DIR).join("tests/testdata"))
        .find(|d| d.is_dir());
    found.unwrap_or_else(|| {
        panic!(
            "{CRATE_DIR}/tests/testdata not found under {}: build udos-core once so cargo \
             unpacks the crate, or update CRATE_DIR to the version in Cargo.lock",
            src.display()
        )
    })
}

fn load_cases(dir: &Path) -> Vec<Case> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("read test file");
        // Our own parser keeps key order, which toJSON and `*` results depend on.
        let suite = Value::from_json_str(&text).expect("test file is JSON");
        for (group, list) in suite.as_object().expect("groups") {
            let Value::Array(list) = list else {
                panic!("{file}::{group}: not a list")
            };
            for raw in list {
                cases.push(case(&file, group, raw));
            }
        }
    }
    cases
}

fn case(file: &str, group: &str, raw: &Value) -> Case {
    let contexts = match raw.get("contexts") {
        Some(Value::Object(c)) => c.clone(),
        Some(other) => panic!("{file}::{group}: contexts {other:?}"),
        None => Object::new(),
    };
    let expected = match (raw.get("result"), raw.get("err")) {
        (Some(r), _) => Ok(expected_value(r)),
        (None, Some(e)) => Err(e.get("value").map(Value::to_string).unwrap_or_default()),
        (None, None) => panic!("{file}::{group}: neither result nor err"),
    };
    Case {
        file: file.to_string(),
        group: group.to_string(),
        expr: raw
            .get("expr")
            .and_then(Value::as_str)
            .expect("expr")
            .to_string(),
        contexts,
        expected,
    }
}

/// The expected value; the kind says how to read JSON's `null` (NaN has no JSON form).
fn expected_value(result: &Value) -> Value {
    let v = result.get("value").cloned().unwrap_or_default();
    match (result.get("kind").and_then(Value::as_str), v) {
        (Some("Number"), Value::Null) => Value::Number(f64::NAN),
        (Some("Null" | "Boolean" | "Number" | "String" | "Array" | "Object"), v) => v,
        (kind, _) => panic!("unknown kind {kind:?}"),
    }
}
