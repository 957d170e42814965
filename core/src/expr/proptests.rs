//! Properties that must hold for any value or text.

use proptest::prelude::*;

use super::*;

const OK: Status = Status {
    success: true,
    failure: false,
    cancelled: false,
};

/// Scalars that exercise coercion: numeric strings, case variants, NaN.
///
/// `finite` numbers have at most 15 significant digits (what GitHub prints) and small
/// exponents: serde_json as the workspace configures it (without `float_roundtrip`)
/// can misread longer ones by one unit in the last place, e.g. 1.1479072688858599e110.
fn scalar(finite: bool) -> BoxedStrategy<Value> {
    const MAX_EXACT: i64 = 1 << 53;
    let number = if finite {
        prop_oneof![
            (-MAX_EXACT..MAX_EXACT).prop_map(|n| n as f64),
            (-999_999_999_999_999i64..=999_999_999_999_999, -15i32..=15)
                .prop_map(|(m, e)| format!("{m}e{e}").parse::<f64>().unwrap_or_default()),
        ]
        .boxed()
    } else {
        proptest::num::f64::ANY.boxed()
    };
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number.prop_map(Value::Number),
        "[aAbB0-9 .x+-]{0,5}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ]
    .boxed()
}

fn value(finite: bool) -> impl Strategy<Value = Value> {
    scalar(finite).prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-dA-D_]{1,3}", inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

fn with<T>(pairs: &[(&str, &Value)], f: impl FnOnce(&EvalEnv) -> T) -> T {
    let contexts: Object = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).clone()))
        .collect();
    f(&EvalEnv {
        contexts: &contexts,
        status: OK,
        hash_files: None,
    })
}

/// `text` as a single-quoted expression literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

proptest! {
    #[test]
    fn equality_is_symmetric(a in value(false), b in value(false)) {
        with(&[("a", &a), ("b", &b)], |env| {
            let ab = evaluate("a == b", env);
            prop_assert_eq!(&ab, &evaluate("b == a", env));
            prop_assert_eq!(evaluate("a != b", env), ab.map(|v| Value::Bool(!v.truthy())));
            Ok(())
        })?;
    }

    #[test]
    fn equality_is_symmetric_between_literals_and_values(a in value(false), s in "[aAbB0-9 .x-]{0,5}") {
        let lit = literal(&s);
        with(&[("a", &a)], |env| {
            prop_assert_eq!(evaluate(&format!("a == {lit}"), env), evaluate(&format!("{lit} == a"), env));
            Ok(())
        })?;
    }

    #[test]
    fn double_negation_is_truthiness(x in value(false)) {
        with(&[("x", &x)], |env| {
            prop_assert_eq!(evaluate("!!x", env), Ok(Value::Bool(x.truthy())));
            Ok(())
        })?;
    }

    #[test]
    fn from_json_inverts_to_json(v in value(true)) {
        with(&[("v", &v)], |env| {
            prop_assert_eq!(evaluate("fromJSON(toJSON(v))", env), Ok(v.clone()));
            Ok(())
        })?;
    }

    #[test]
    fn text_without_expressions_is_itself(text in any::<String>()) {
        prop_assume!(!text.contains("${{"));
        with(&[], |env| {
            prop_assert_eq!(interpolate_to_string(&text, env), Ok(text.clone()));
            prop_assert_eq!(evaluate_template(&text, env), Ok(Value::String(text.clone())));
            let pieces = interpolate(&text, env).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let expected = if text.is_empty() { vec![] } else { vec![Piece::Text(text.clone())] };
            prop_assert_eq!(pieces, expected);
            Ok(())
        })?;
    }

    #[test]
    fn format_with_only_escaped_braces_is_the_literal(text in "([a-z'{} ]|\\PC){0,20}") {
        let fmt = text.replace('{', "{{").replace('}', "}}");
        with(&[], |env| {
            prop_assert_eq!(
                evaluate(&format!("format({}, 'unused')", literal(&fmt)), env),
                Ok(Value::String(text.clone()))
            );
            Ok(())
        })?;
    }
}
