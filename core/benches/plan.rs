//! Planning a big workflow on the host, in the pure core: parse, select the jobs, then
//! drive the engine to the end (every job decided, every leg's ticket built, every leg
//! finished at once). Prints the figures beside the target (100 ms); not a pass/fail
//! test.
//!
//! `cargo bench -p udos-core --bench plan`

use std::time::{Duration, Instant};

use udos_core::engine::contexts::RunFacts;
use udos_core::engine::graph::{check_supported, select, stages, WorkflowSet};
use udos_core::engine::run::{Action, LegResult, Run, RunConfig};
use udos_core::engine::Conclusion;
use udos_core::value::Object;
use udos_core::workflow::parse;

const TARGET: Duration = Duration::from_millis(100);

/// `jobs` jobs in a layered graph (each needs one of the ten before it), the first
/// `with_matrix` of them with a 50-leg matrix (10 × 5).
fn workflow(jobs: usize, with_matrix: usize) -> String {
    let mut s = String::from("name: big\non: push\nenv: { A: '1' }\njobs:\n");
    for i in 0..jobs {
        s.push_str(&format!("  j{i}:\n    runs-on: ubuntu-latest\n"));
        if i >= 10 {
            s.push_str(&format!("    needs: j{}\n", i - 10 + (i % 7) % 10));
        }
        if i < with_matrix {
            s.push_str(
                "    strategy:\n      matrix:\n        a: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n        b: [x, y, z, v, w]\n",
            );
        }
        s.push_str(&format!(
            "    outputs: {{ o: \"${{{{ steps.s.outputs.o }}}}\" }}\n    if: ${{{{ github.ref == 'refs/heads/main' }}}}\n    steps:\n      - id: s\n        run: echo \"${{{{ matrix.a }}}} {i}\"\n"
        ));
    }
    s
}

struct Figures {
    parse: Duration,
    plan: Duration,
    drive: Duration,
    legs: usize,
}

fn measure(text: &str) -> Figures {
    let t = Instant::now();
    let wf = parse(text, "big.yml").expect("the bench workflow parses");
    let parse_t = t.elapsed();

    let t = Instant::now();
    let set = WorkflowSet {
        top: vec![wf],
        ..WorkflowSet::default()
    };
    let sel = select(&set, &[true], &[]).expect("select");
    check_supported(&set, &sel, false).expect("supported");
    stages(&set.top[0], &sel.workflows[0].1).expect("stages");
    let cfg = RunConfig {
        facts: RunFacts {
            event_name: "push".into(),
            git_ref: "refs/heads/main".into(),
            repository: "o/r".into(),
            ..RunFacts::default()
        },
        max_running: usize::MAX,
        ..RunConfig::default()
    };
    let mut run = Run::new(set, &sel, cfg).expect("run");
    let plan_t = t.elapsed();

    let t = Instant::now();
    let mut legs = 0;
    loop {
        let started: Vec<usize> = run
            .poll()
            .into_iter()
            .filter_map(|a| match a {
                Action::Start(t) => Some(t.id),
                Action::Cancel(_) => None,
            })
            .collect();
        if started.is_empty() {
            break;
        }
        for id in started {
            legs += 1;
            run.leg_finished(
                id,
                LegResult {
                    outcome: Conclusion::Success,
                    outputs: Object::new(),
                    error: None,
                },
            );
        }
    }
    assert!(run.is_done());
    Figures {
        parse: parse_t,
        plan: plan_t,
        drive: t.elapsed(),
        legs,
    }
}

fn best_of(n: usize, text: &str) -> Figures {
    (0..n)
        .map(|_| measure(text))
        .min_by_key(|f| f.parse + f.plan + f.drive)
        .expect("at least one run")
}

fn main() {
    println!("planning on the host (pure core), best of 5; target for parse + plan: {TARGET:?}");
    for (label, with_matrix) in [
        ("200 jobs, one with a 50-leg matrix", 1),
        ("200 jobs, every one with a 50-leg matrix", 200),
    ] {
        let text = workflow(200, with_matrix);
        let f = best_of(5, &text);
        let planning = f.parse + f.plan;
        println!(
            "{label}: parse {:.1} ms, select + check + stages + engine {:.1} ms = {:.1} ms ({:.2}x the target); deciding and issuing all {} legs {:.1} ms",
            f.parse.as_secs_f64() * 1e3,
            f.plan.as_secs_f64() * 1e3,
            planning.as_secs_f64() * 1e3,
            planning.as_secs_f64() / TARGET.as_secs_f64(),
            f.legs,
            f.drive.as_secs_f64() * 1e3,
        );
    }
}
