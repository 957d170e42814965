//! Tables from GitHub's expressions documentation
//! (<https://docs.github.com/en/actions/reference/workflows-and-actions/expressions>,
//! cited as "docs: section"), and the behaviour around them.

use super::*;

const OK: Status = Status {
    success: true,
    failure: false,
    cancelled: false,
};
const FAILED: Status = Status {
    success: false,
    failure: true,
    cancelled: false,
};
const CANCELLED: Status = Status {
    success: false,
    failure: false,
    cancelled: true,
};

/// Contexts for the documented examples.
const CONTEXTS: &str = r#"{
    "github": {
        "event_name": "push",
        "ref": "refs/heads/main",
        "sha": "abc123",
        "event": {"issue": {"labels": [{"name": "bug"}, {"name": "help wanted"}]}}
    },
    "env": {"continue": "true", "time": "3", "EMPTY": ""},
    "job": {"status": "success"},
    "steps": {
        "demo": {"conclusion": "failure", "outputs": {}},
        "count": {"outputs": {"ten": "10", "nine": "9"}}
    },
    "needs": {"job1": {"outputs": {
        "matrix": "{\"include\":[{\"project\":\"foo\",\"config\":\"Debug\"},{\"project\":\"bar\",\"config\":\"Release\"}]}"
    }}},
    "matrix": {"project": "foo", "config": "Debug"},
    "fruits": [
        {"name": "apple", "quantity": 1},
        {"name": "orange", "quantity": 2},
        {"name": "pear", "quantity": 1}
    ],
    "vegetables": {
        "scallions": {"colors": ["green", "white", "red"], "ediblePortions": ["roots", "stalks"]},
        "beets": {"colors": ["purple", "red"], "ediblePortions": ["roots", "stems", "leaves"]},
        "artichokes": {"colors": ["green"], "ediblePortions": ["hearts", "stems", "leaves"]}
    }
}"#;

fn contexts(json: &str) -> Object {
    match Value::from_json_str(json).expect("test contexts are JSON") {
        Value::Object(o) => o,
        other => panic!("contexts must be an object, not {other:?}"),
    }
}

fn env(contexts: &Object, status: Status) -> EvalEnv<'_> {
    EvalEnv {
        contexts,
        status,
        hash_files: None,
    }
}

fn json(text: &str) -> Value {
    Value::from_json_str(text).expect("expected value is JSON")
}

/// Evaluates each row's expression over [`CONTEXTS`] and compares with its JSON value.
fn check_table(rows: &[(&str, &str, &str)]) {
    let ctx = contexts(CONTEXTS);
    for (source, expr, expected) in rows {
        let got = evaluate(expr, &env(&ctx, OK));
        assert_eq!(got, Ok(json(expected)), "{source}: `{expr}`");
    }
}

#[test]
fn documented_literals() {
    check_table(&[
        ("docs: Example of literals", "null", "null"),
        ("docs: Example of literals", "false", "false"),
        ("docs: Example of literals", "711", "711"),
        ("docs: Example of literals", "-9.2", "-9.2"),
        ("docs: Example of literals", "0xff", "255"),
        ("docs: Example of literals", "-2.99e-2", "-0.0299"),
        (
            "docs: Example of literals",
            "'It''s open source!'",
            r#""It's open source!""#,
        ),
    ]);
    let ctx = contexts(CONTEXTS);
    // docs: Example of literals, `myString: Mona the Octocat` (no expression at all).
    assert_eq!(
        evaluate_template("Mona the Octocat", &env(&ctx, OK)),
        Ok(Value::str("Mona the Octocat"))
    );
}

#[test]
fn documented_falsy_values_are_false_in_conditionals() {
    // docs: Literals, "falsy values (false, 0, -0, "", '', null) are coerced to false".
    let ctx = contexts(CONTEXTS);
    for expr in ["false", "0", "-0", "''", "null", "env.EMPTY"] {
        assert_eq!(condition(expr, &env(&ctx, OK)), Ok(false), "{expr}");
    }
    for expr in [
        "true",
        "1",
        "'0'",
        "'false'",
        "fromJSON('[]')",
        "github.event",
    ] {
        assert_eq!(condition(expr, &env(&ctx, OK)), Ok(true), "{expr}");
    }
}

#[test]
fn documented_operators() {
    check_table(&[
        ("docs: Operators, ( )", "(true || false) && false", "false"),
        ("docs: Operators, ( )", "true || (false && false)", "true"),
        ("docs: Operators, [ ]", "github['event_name']", r#""push""#),
        ("docs: Operators, [ ]", "fruits[1].name", r#""orange""#),
        ("docs: Operators, .", "github.event_name", r#""push""#),
        ("docs: Operators, !", "!true", "false"),
        ("docs: Operators, !", "!github.nothing", "true"),
        ("docs: Operators, <", "1 < 2", "true"),
        ("docs: Operators, <=", "2 <= 2", "true"),
        ("docs: Operators, >", "1 > 2", "false"),
        ("docs: Operators, >=", "3 >= 2", "true"),
        ("docs: Operators, ==", "github.event_name == 'push'", "true"),
        (
            "docs: Operators, !=",
            "github.event_name != 'push'",
            "false",
        ),
        // `&&` and `||` return an operand, not a boolean (upstream op_and/op_or).
        ("docs: Operators, &&", "true && 'yes'", r#""yes""#),
        ("docs: Operators, &&", "'' && 'yes'", r#""""#),
        (
            "docs: Operators, ||",
            "github.nothing || 'default'",
            r#""default""#,
        ),
        (
            "docs: Operators, ||",
            "github.sha || 'default'",
            r#""abc123""#,
        ),
        (
            "docs: Operators, note: case",
            "'PUSH' == github.event_name",
            "true",
        ),
        ("docs: Operators, note: case", "'a' < 'B'", "true"),
        // docs: Operators, notes: outputs are strings; fromJSON for numbers.
        (
            "docs: Operators, note: fromJSON",
            "steps.count.outputs.ten > steps.count.outputs.nine",
            "false",
        ),
        (
            "docs: Operators, note: fromJSON",
            "fromJSON(steps.count.outputs.ten) > fromJSON(steps.count.outputs.nine)",
            "true",
        ),
        // Missing properties, out-of-range indexes and access on non-objects are null.
        (
            "docs: Operators, . and [ ]",
            "github.nothing.deeper",
            "null",
        ),
        ("docs: Operators, . and [ ]", "fruits[5]", "null"),
        ("docs: Operators, . and [ ]", "github.sha.length", "null"),
        (
            "docs: Operators, . and [ ]",
            "GITHUB.Event_Name",
            r#""push""#,
        ),
    ]);
}

#[test]
fn loose_equality_and_coercion() {
    // docs: Operators, loose equality: types that differ are coerced to numbers
    // (null 0, true 1, false 0, '' 0, strings parsed or NaN, arrays and objects NaN);
    // NaN in any relational comparison is false; arrays and objects are equal only
    // when they are the same instance.
    check_table(&[
        ("docs: null → 0", "null == 0", "true"),
        ("docs: null → 0", "null == false", "true"),
        ("docs: null → 0", "null == ''", "true"),
        ("docs: null → 0", "null < 1", "true"),
        ("docs: true → 1", "true == 1", "true"),
        ("docs: false → 0", "false == 0", "true"),
        ("docs: true → 1", "true == 2", "false"),
        ("docs: '' → 0", "'' == 0", "true"),
        ("docs: string parsed", "'1' == 1", "true"),
        ("docs: string parsed", "' 2.5 ' == 2.5", "true"),
        ("docs: string parsed", "'0x10' == 16", "true"),
        ("docs: string parsed", "'1e3' == 1000", "true"),
        ("docs: string parsed", "'10' > 9", "true"),
        ("docs: 'abc' → NaN", "'abc' == 0", "false"),
        ("docs: 'abc' → NaN", "'true' == true", "false"),
        ("docs: NaN relational", "'abc' < 1", "false"),
        ("docs: NaN relational", "'abc' >= 1", "false"),
        ("docs: NaN relational", "NaN == NaN", "false"),
        ("docs: NaN relational", "NaN != NaN", "true"),
        ("docs: array → NaN", "fromJSON('[]') == 0", "false"),
        ("docs: object → NaN", "fromJSON('{}') == 0", "false"),
        ("docs: object → NaN", "fromJSON('{}') != 0", "true"),
        (
            "docs: same instance",
            "github.event == github.event",
            "true",
        ),
        (
            "docs: same instance",
            "github.event >= github.event",
            "true",
        ),
        (
            "docs: same instance",
            "(github.event || 1) == github.event",
            "true",
        ),
        (
            "docs: same instance",
            "fromJSON('{}') == fromJSON('{}')",
            "false",
        ),
        (
            "docs: same instance",
            "fruits == fromJSON(toJSON(fruits))",
            "false",
        ),
        ("docs: same instance", "fruits != fruits.*", "true"),
        ("docs: ignores case", "'ABC' == 'abc'", "true"),
        ("docs: ignores case", "'abc' != 'abd'", "true"),
        ("docs: ignores case", "'b' > 'A'", "true"),
        // Two strings compare as strings, not numbers.
        ("docs: ignores case", "'10' < '9'", "true"),
        ("docs: ignores case", "true > false", "true"),
    ]);
}

#[test]
fn documented_functions() {
    check_table(&[
        (
            "docs: contains, using a string",
            "contains('Hello world', 'llo')",
            "true",
        ),
        (
            "docs: contains, not case sensitive",
            "contains('Hello world', 'LLO')",
            "true",
        ),
        (
            "docs: contains, casts to string",
            "contains('1234', 23)",
            "true",
        ),
        (
            "docs: contains, object filter",
            "contains(github.event.issue.labels.*.name, 'bug')",
            "true",
        ),
        (
            "docs: contains, object filter",
            "contains(github.event.issue.labels.*.name, 'BUG')",
            "true",
        ),
        (
            "docs: contains, object filter",
            "contains(github.event.issue.labels.*.name, 'feature')",
            "false",
        ),
        (
            "docs: contains, array of strings",
            r#"contains(fromJSON('["push", "pull_request"]'), github.event_name)"#,
            "true",
        ),
        (
            "docs: contains, array of strings",
            r#"contains(fromJSON('["push"]'), 'issues')"#,
            "false",
        ),
        (
            "docs: contains, array of strings",
            "contains(fromJSON('[1, 2]'), '2')",
            "true",
        ),
        (
            "docs: startsWith",
            "startsWith('Hello world', 'He')",
            "true",
        ),
        (
            "docs: startsWith, not case sensitive",
            "startsWith('Hello world', 'hE')",
            "true",
        ),
        (
            "docs: startsWith",
            "startsWith('Hello world', 'world')",
            "false",
        ),
        ("docs: endsWith", "endsWith('Hello world', 'ld')", "true"),
        (
            "docs: endsWith, not case sensitive",
            "endsWith('Hello world', 'LD')",
            "true",
        ),
        ("docs: endsWith", "endsWith('Hello world', 'He')", "false"),
        (
            "docs: Example of format",
            "format('Hello {0} {1} {2}', 'Mona', 'the', 'Octocat')",
            r#""Hello Mona the Octocat""#,
        ),
        (
            "docs: Example escaping braces",
            "format('{{Hello {0} {1} {2}!}}', 'Mona', 'the', 'Octocat')",
            r#""{Hello Mona the Octocat!}""#,
        ),
        (
            "docs: format, casts to string",
            "format('{0}|{1}|{2}', null, true, 1.50)",
            r#""|true|1.5""#,
        ),
        (
            "docs: Example of join",
            "join(github.event.issue.labels.*.name, ', ')",
            r#""bug, help wanted""#,
        ),
        (
            "docs: join, default separator",
            "join(github.event.issue.labels.*.name)",
            r#""bug,help wanted""#,
        ),
        ("docs: join, a string", "join('abc')", r#""abc""#),
        (
            "docs: Example of toJSON",
            "toJSON(job)",
            r#""{\n  \"status\": \"success\"\n}""#,
        ),
        (
            "docs: toJSON keeps key order",
            "toJSON(fruits[0])",
            r#""{\n  \"name\": \"apple\",\n  \"quantity\": 1\n}""#,
        ),
        (
            "docs: fromJSON, a JSON data type",
            "fromJSON(env.continue)",
            "true",
        ),
        (
            "docs: fromJSON, a JSON data type",
            "fromJSON(env.time)",
            "3",
        ),
        (
            "docs: fromJSON, a JSON object",
            "fromJSON(needs.job1.outputs.matrix).include[1].config",
            r#""Release""#,
        ),
        (
            "docs: case, single predicate",
            "case(github.ref == 'refs/heads/main', 'production', 'development')",
            r#""production""#,
        ),
        (
            "docs: case, single predicate",
            "case(github.ref == 'refs/heads/dev', 'production', 'development')",
            r#""development""#,
        ),
        (
            "docs: case, returns the value as is",
            "case(true, fromJSON('[1]'), 2)",
            "[1]",
        ),
    ]);
}

#[test]
fn documented_fromjson_workflow_examples() {
    let ctx = contexts(CONTEXTS);
    let e = env(&ctx, OK);
    // docs: fromJSON, Example returning a JSON object: `matrix: ${{ fromJSON(...) }}`.
    let matrix = evaluate_template("${{ fromJSON(needs.job1.outputs.matrix) }}", &e);
    assert_eq!(
        matrix,
        Ok(json(
            r#"{"include":[{"project":"foo","config":"Debug"},{"project":"bar","config":"Release"}]}"#
        ))
    );
    assert_eq!(
        interpolate_to_string(
            r#"echo "Matrix - Project ${{ matrix.project }}, Config ${{ matrix.config }}""#,
            &e
        ),
        Ok(r#"echo "Matrix - Project foo, Config Debug""#.to_string())
    );
    // docs: fromJSON, Example returning a JSON data type: typed, not strings.
    assert_eq!(
        evaluate_template("${{ fromJSON(env.continue) }}", &e),
        Ok(Value::Bool(true))
    );
    assert_eq!(
        evaluate_template("${{ fromJSON(env.time) }}", &e),
        Ok(Value::Number(3.0))
    );
}

#[test]
fn documented_case_with_multiple_predicates() {
    // docs: case, Example with multiple predicates (a `|-` block scalar).
    let template = "${{ case(\n  github.ref == 'refs/heads/main', 'production',\n  \
                    github.ref == 'refs/heads/staging', 'staging',\n  \
                    startsWith(github.ref, 'refs/heads/feature/'), 'development',\n  \
                    'unknown'\n) }}";
    for (git_ref, expected) in [
        ("refs/heads/main", "production"),
        ("refs/heads/staging", "staging"),
        ("refs/heads/feature/x", "development"),
        ("refs/tags/v1", "unknown"),
    ] {
        let ctx = contexts(&format!(r#"{{"github": {{"ref": "{git_ref}"}}}}"#));
        assert_eq!(
            evaluate_template(template, &env(&ctx, OK)),
            Ok(Value::str(expected)),
            "{git_ref}"
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Hashes the patterns it is given, so a test sees which patterns arrived, in order.
struct PatternHasher;

impl HashFiles for PatternHasher {
    fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
        if patterns.iter().any(|p| p.is_empty()) {
            return Err("empty pattern".to_string());
        }
        Ok(sha256_hex(patterns.join("\n").as_bytes()))
    }
}

#[test]
fn documented_hashfiles_goes_through_the_callers_hasher() {
    let ctx = contexts(CONTEXTS);
    let hasher = PatternHasher;
    let with = EvalEnv {
        contexts: &ctx,
        status: OK,
        hash_files: Some(&hasher),
    };
    // docs: hashFiles, Examples with multiple patterns.
    let got = evaluate(
        "hashFiles('**/package-lock.json', '**/Gemfile.lock')",
        &with,
    );
    let want = sha256_hex(b"**/package-lock.json\n**/Gemfile.lock");
    assert_eq!(got, Ok(Value::String(want)));
    let failed = evaluate("hashFiles('')", &with).unwrap_err();
    assert!(
        failed.to_string().contains("hashFiles: empty pattern"),
        "{failed}"
    );
    let unavailable = evaluate("hashFiles('**/x')", &env(&ctx, OK)).unwrap_err();
    assert!(
        matches!(&unavailable, ExprError::Function { function, message, .. }
            if function == "hashFiles" && message.contains("not available")),
        "{unavailable:?}"
    );
}

#[test]
fn documented_status_check_functions() {
    let ctx = contexts(CONTEXTS);
    let rows: &[(&str, &str, Status, bool)] = &[
        ("docs: success", "${{ success() }}", OK, true),
        ("docs: success", "${{ success() }}", FAILED, false),
        ("docs: always", "${{ always() }}", FAILED, true),
        (
            "docs: always, even when canceled",
            "${{ always() }}",
            CANCELLED,
            true,
        ),
        (
            "docs: always, recommended alternative",
            "${{ !cancelled() }}",
            FAILED,
            true,
        ),
        (
            "docs: always, recommended alternative",
            "${{ !cancelled() }}",
            CANCELLED,
            false,
        ),
        ("docs: cancelled", "${{ cancelled() }}", CANCELLED, true),
        ("docs: cancelled", "${{ cancelled() }}", OK, false),
        ("docs: failure", "${{ failure() }}", FAILED, true),
        ("docs: failure", "${{ failure() }}", OK, false),
        (
            "docs: failure with conditions",
            "${{ failure() && steps.demo.conclusion == 'failure' }}",
            FAILED,
            true,
        ),
        // docs: "you must still include failure() to override the default status check".
        (
            "docs: failure with conditions",
            "steps.demo.conclusion == 'failure'",
            FAILED,
            false,
        ),
        (
            "docs: failure with conditions",
            "steps.demo.conclusion == 'failure'",
            OK,
            true,
        ),
    ];
    for (source, cond, status, expected) in rows {
        assert_eq!(
            condition(cond, &env(&ctx, *status)),
            Ok(*expected),
            "{source}: `{cond}` with {status:?}"
        );
    }
}

#[test]
fn documented_object_filters() {
    check_table(&[
        (
            "docs: Object filters, array",
            "fruits.*.name",
            r#"["apple", "orange", "pear"]"#,
        ),
        (
            "docs: Object filters, array",
            "fruits[*].quantity",
            "[1, 2, 1]",
        ),
        (
            "docs: Object filters, object",
            "vegetables.*.ediblePortions",
            r#"[["roots", "stalks"], ["roots", "stems", "leaves"], ["hearts", "stems", "leaves"]]"#,
        ),
        (
            "docs: Object filters, nested",
            "vegetables.*.ediblePortions.*",
            r#"["roots", "stalks", "roots", "stems", "leaves", "hearts", "stems", "leaves"]"#,
        ),
        (
            "docs: Object filters, index per item",
            "vegetables.*.colors[1]",
            r#"["white", "red"]"#,
        ),
        ("docs: Object filters, on a scalar", "github.sha.*", "[]"),
        (
            "docs: Object filters, on null",
            "github.nothing.*.name",
            "[]",
        ),
    ]);
    // Items without the property are left out, not null: languageservices
    // `filteredArrayAccess` and upstream case op_idx_star "nested-object-property-not-found".
    let ctx =
        contexts(r#"{"xs": [{"name": "a"}, {"other": 1}, {"name": null}, 5, {"NAME": "c"}]}"#);
    assert_eq!(
        evaluate("xs.*.name", &env(&ctx, OK)),
        Ok(json(r#"["a", null, "c"]"#))
    );
}

#[test]
fn condition_adds_success_unless_a_status_function_is_called() {
    let ctx = contexts(CONTEXTS);
    let push = "github.event_name == 'push'";
    assert_eq!(condition(push, &env(&ctx, OK)), Ok(true));
    assert_eq!(condition(push, &env(&ctx, FAILED)), Ok(false));
    assert_eq!(condition(push, &env(&ctx, CANCELLED)), Ok(false));
    let always = "always() && github.event_name == 'push'";
    assert_eq!(condition(always, &env(&ctx, FAILED)), Ok(true));
    // A status function anywhere counts, even inside another call.
    assert_eq!(
        condition("format('{0}', failure()) == 'true'", &env(&ctx, FAILED)),
        Ok(true)
    );
    // Empty: success().
    assert_eq!(condition("  ", &env(&ctx, OK)), Ok(true));
    assert_eq!(condition("", &env(&ctx, FAILED)), Ok(false));
}

#[test]
fn condition_reads_bare_and_wrapped_the_same() {
    let ctx = contexts(CONTEXTS);
    for (bare, expected) in [
        ("github.event_name == 'push'", true),
        ("github.event_name != 'push'", false),
        ("!cancelled()", true),
        ("contains(github.event.issue.labels.*.name, 'bug')", true),
    ] {
        for text in [
            bare.to_string(),
            format!("${{{{ {bare} }}}}"),
            format!("  ${{{{{bare}}}}}\n"),
        ] {
            assert_eq!(condition(&text, &env(&ctx, OK)), Ok(expected), "`{text}`");
        }
    }
}

#[test]
fn condition_with_text_around_an_expression_is_a_string() {
    // GitHub's template reader turns `${{ false }} && true` into
    // format('{0} && true', false): the string "false && true", which is true.
    let ctx = contexts(CONTEXTS);
    assert_eq!(condition("${{ false }} && true", &env(&ctx, OK)), Ok(true));
    assert_eq!(
        condition("${{ false }} && true", &env(&ctx, FAILED)),
        Ok(false)
    );
    assert_eq!(condition("${{ '' }}${{ '' }}", &env(&ctx, OK)), Ok(false));
    assert_eq!(condition("${{ always() }} x", &env(&ctx, FAILED)), Ok(true));
}

#[test]
fn short_circuit_skips_errors_on_the_side_not_taken() {
    let ctx = contexts(CONTEXTS);
    let e = env(&ctx, OK);
    assert_eq!(evaluate("false && nosuch.x", &e), Ok(Value::Bool(false)));
    assert_eq!(
        evaluate("true || fromJSON('not json')", &e),
        Ok(Value::Bool(true))
    );
    assert_eq!(
        condition("github.event_name == 'pr' && nosuch.x", &e),
        Ok(false)
    );
    // The implicit success() fails first: the expression is not evaluated at all.
    assert_eq!(
        condition("fromJSON('not json')", &env(&ctx, FAILED)),
        Ok(false)
    );
    // ... and when it is evaluated, the error shows.
    assert!(condition("fromJSON('not json')", &e).is_err());
    assert!(matches!(
        evaluate("true && nosuch.x", &e),
        Err(ExprError::UnknownContext { name, .. }) if name == "nosuch"
    ));
    // case and format evaluate only what they use, as the runner does.
    assert_eq!(
        evaluate("case(true, 'a', fromJSON(''))", &e),
        Ok(Value::str("a"))
    );
    assert_eq!(
        evaluate("format('{0}', 'a', nosuch.x)", &e),
        Ok(Value::str("a"))
    );
}

#[test]
fn interpolate_splits_text_and_expressions() {
    let ctx = contexts(CONTEXTS);
    let pieces = interpolate("sha ${{ github.sha }} on ${{github.REF}}!", &env(&ctx, OK));
    assert_eq!(
        pieces,
        Ok(vec![
            Piece::Text("sha ".into()),
            Piece::Expr {
                source: "github.sha".into(),
                value: Value::str("abc123")
            },
            Piece::Text(" on ".into()),
            Piece::Expr {
                source: "github.REF".into(),
                value: Value::str("refs/heads/main")
            },
            Piece::Text("!".into()),
        ])
    );
}

#[test]
fn interpolate_ignores_closing_braces_inside_string_literals() {
    let ctx = contexts(CONTEXTS);
    let e = env(&ctx, OK);
    for (template, expected) in [
        ("${{ '}}' }}", "}}"),
        ("a${{ 'x}}y' }}b${{ '}' }}c", "ax}}yb}c"),
        ("${{ 'it''s }}' }}", "it's }}"),
        ("${{ format('{{0}}') }}", "{0}"),
        ("x }} ${{ 1 }} {{ y", "x }} 1 {{ y"),
    ] {
        assert_eq!(
            interpolate_to_string(template, &e),
            Ok(expected.to_string()),
            "{template}"
        );
    }
}

#[test]
fn whole_string_templates_keep_their_type() {
    let ctx = contexts(CONTEXTS);
    let e = env(&ctx, OK);
    for (template, expected) in [
        ("${{ 3 }}", "3"),
        ("  ${{ true }}\n", "true"),
        ("${{ null }}", "null"),
        ("${{ fromJSON('[1, \"a\"]') }}", r#"[1, "a"]"#),
        ("${{ github.event.issue.labels[0] }}", r#"{"name": "bug"}"#),
        ("v${{ 3 }}", r#""v3""#),
        ("${{ 1 }}${{ 2 }}", r#""12""#),
        ("x${{ null }}y", r#""xy""#),
        (
            "${{ 1.50 }} ${{ fruits }} ${{ job }}",
            r#""1.5 Array Object""#,
        ),
        ("no expression", r#""no expression""#),
    ] {
        assert_eq!(
            evaluate_template(template, &e),
            Ok(json(expected)),
            "{template}"
        );
    }
}

#[test]
fn unterminated_expressions_are_errors_naming_the_template() {
    let ctx = contexts(CONTEXTS);
    let e = env(&ctx, OK);
    for (template, offset) in [
        ("echo ${{ github.sha", 5),
        ("${{ '}}' ", 0),
        ("${{ 1 }} ${{ '}}", 9),
    ] {
        let err = interpolate(template, &e).unwrap_err();
        assert_eq!(
            err,
            ExprError::Unterminated {
                template: template.to_string(),
                offset
            }
        );
        assert!(err.to_string().contains(template), "{err}");
        assert_eq!(evaluate_template(template, &e).unwrap_err(), err);
    }
}

#[test]
fn errors_name_the_expression_and_the_problem() {
    let ctx = contexts(CONTEXTS);
    let e = env(&ctx, OK);
    let cases: &[(&str, &[&str])] = &[
        (
            "githb.sha",
            &["`githb.sha`", "unknown context `githb`", "github"],
        ),
        ("foo(1)", &["`foo(1)`", "unknown function `foo`"]),
        (
            "fromJSON('{bad')",
            &["`fromJSON('{bad')`", "fromJSON: invalid JSON", "column 2"],
        ),
        ("fromJSON(env.EMPTY)", &["fromJSON: empty input"]),
        (
            "format('{0}')",
            &["format: format string '{0}' references argument 0"],
        ),
        ("format('{0:x}', 1)", &["format: format specifier `x`"]),
        ("format('{', 1)", &["format: invalid format string '{'"]),
        ("format('a}b')", &["format: invalid format string 'a}b'"]),
        (
            "case('x', 1, 2)",
            &["case: predicate `'x'` is not a boolean"],
        ),
        (
            "contains('a')",
            &["`contains('a')`", "contains: takes exactly 2 arguments"],
        ),
        ("github.sha ==", &["invalid expression `github.sha ==`"]),
        ("'unclosed", &["invalid expression `'unclosed`"]),
    ];
    for (expr, needles) in cases {
        let message = evaluate(expr, &e).unwrap_err().to_string();
        for needle in *needles {
            assert!(
                message.contains(needle),
                "`{expr}`: {message:?} lacks {needle:?}"
            );
        }
    }
}

#[test]
fn referenced_contexts_without_evaluating() {
    let names = |t: &str| referenced_contexts(t).map(|s| s.into_iter().collect::<Vec<_>>());
    assert_eq!(
        names("${{ github.sha }} ${{ secrets.TOKEN || env.X }}"),
        Ok(vec!["env".into(), "github".into(), "secrets".into()])
    );
    assert_eq!(
        names("${{ format('{0}', steps.a.outputs[matrix.key]) }}"),
        Ok(vec!["matrix".into(), "steps".into()])
    );
    assert_eq!(
        names("${{ fromJSON(Needs.a.outputs.x).y }}"),
        Ok(vec!["needs".into()])
    );
    assert_eq!(names("${{ !(inputs.a) && 1 }}"), Ok(vec!["inputs".into()]));
    assert_eq!(names("${{ success() && 'x' }}"), Ok(vec![]));
    assert_eq!(names("plain text, steps.a"), Ok(vec![]));
    assert!(names("${{ steps.").is_err());
    let bare = expression_contexts("success() && needs.build.result == 'success'");
    assert_eq!(
        bare.map(|s| s.into_iter().collect::<Vec<_>>()),
        Ok(vec!["needs".into()])
    );
}

#[test]
fn has_expression_looks_for_the_opening() {
    assert!(has_expression("a ${{ b }}"));
    assert!(has_expression("${{"));
    assert!(!has_expression("a {{ b }} $ {"));
    assert!(!has_expression(""));
}

#[test]
fn numbers_from_strings_follow_the_runner() {
    use super::val::parse_number;
    for (text, expected) in [
        ("", 0.0),
        ("  ", 0.0),
        (" 12 ", 12.0),
        ("+1.5", 1.5),
        ("-.5", -0.5),
        ("5.", 5.0),
        ("1e3", 1000.0),
        ("0x1F", 31.0),
        ("0xFFFFFFFF", -1.0),
        ("0o17", 15.0),
        ("Infinity", f64::INFINITY),
        ("-infinity", f64::NEG_INFINITY),
    ] {
        assert_eq!(parse_number(text), expected, "{text:?}");
    }
    for text in [
        "abc",
        "0x",
        "0x1G",
        "0X1F",
        "0x+1",
        "0x100000000",
        "0o8",
        "inf",
        "nan",
        "NaN",
        "1_000",
        "1e",
    ] {
        assert!(parse_number(text).is_nan(), "{text:?}");
    }
}
