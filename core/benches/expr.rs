//! `cargo bench -p udos-core --bench expr`: the cost of evaluating typical workflow
//! expressions (parse included, as the host evaluates each text once per step).
//! Prints nanoseconds per evaluation; not a pass/fail test.

use std::hint::black_box;
use std::time::Instant;

use udos_core::expr::{condition, evaluate, interpolate_to_string, EvalEnv, Status};
use udos_core::value::Value;

const RUNS: u32 = 20_000;

const CONTEXTS: &str = r#"{
    "github": {"event_name": "pull_request", "ref": "refs/heads/main", "sha": "0123456789abcdef",
               "event": {"issue": {"labels": [{"name": "bug"}, {"name": "ci"}, {"name": "docs"}]}}},
    "matrix": {"os": "debian-12", "node": 20},
    "env": {"MODE": "release"},
    "steps": {"build": {"outputs": {"artifact": "out.tar", "count": "42"}, "conclusion": "success"}}
}"#;

const CASES: &[(&str, &str)] = &[
    ("condition", "github.event_name == 'pull_request' && contains(github.event.issue.labels.*.name, 'bug')"),
    ("condition", "${{ failure() || steps.build.conclusion != 'success' }}"),
    ("expression", "format('{0}-{1}-{2}', matrix.os, matrix.node, github.sha)"),
    ("expression", "fromJSON(steps.build.outputs.count) > 10 && env.MODE || 'debug'"),
    ("expression", "toJSON(github.event)"),
    ("template", "tar -C out -xf ${{ steps.build.outputs.artifact }} # ${{ github.sha }} on ${{ matrix.os }}"),
];

fn main() {
    let Ok(Value::Object(contexts)) = Value::from_json_str(CONTEXTS) else {
        panic!("bench contexts are a JSON object");
    };
    let env = EvalEnv {
        contexts: &contexts,
        status: Status {
            success: true,
            failure: false,
            cancelled: false,
        },
        hash_files: None,
    };
    for (kind, text) in CASES {
        let ns = time(&env, kind, text);
        println!("{ns:8.0} ns/eval  {kind:10}  {text}");
    }
}

fn time(env: &EvalEnv, kind: &str, text: &str) -> f64 {
    let run = || match kind {
        "condition" => condition(text, env).map(Value::Bool),
        "template" => interpolate_to_string(text, env).map(Value::String),
        _ => evaluate(text, env),
    };
    run().unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    for _ in 0..RUNS {
        black_box(run().ok());
    }
    start.elapsed().as_nanos() as f64 / f64::from(RUNS)
}
