//! `workflow_dispatch` and `workflow_call` inputs: defaults, required, types.

use indexmap::IndexMap;

use crate::value::{Object, Value};

/// The `type:` of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputType {
    /// `string` (the default for `workflow_dispatch`).
    String,
    /// `boolean`.
    Boolean,
    /// `number`.
    Number,
    /// `choice`, with its `options:` (`workflow_dispatch` only).
    Choice(Vec<String>),
    /// `environment`: an environment's name (`workflow_dispatch` only).
    Environment,
}

/// One declared input.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// `description:`.
    pub description: Option<String>,
    /// `required:`.
    pub required: bool,
    /// `default:` as written; a string with `${{ }}` is left for the caller to evaluate.
    pub default: Option<Value>,
    /// `type:`.
    pub kind: InputType,
}

/// Inputs that do not fit their declarations.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    /// A given input that is not declared. (GitHub: "If a caller workflow passes an
    /// input that is not specified in the called workflow, this results in an error.")
    #[error("unknown input `{name}` (inputs: {})", list(.known))]
    Unknown {
        /// The given name.
        name: String,
        /// The declared names.
        known: Vec<String>,
    },
    /// A required input that was not given and has no default.
    #[error("input `{name}` is required")]
    Missing {
        /// The input.
        name: String,
    },
    /// A value of the wrong type.
    #[error("input `{name}` must be {expected}, not {got}")]
    Type {
        /// The input.
        name: String,
        /// What its type accepts.
        expected: &'static str,
        /// What was given, described.
        got: String,
    },
    /// A `choice` value that is not one of the options.
    #[error("input `{name}` must be one of {}, not {got}", list(.options))]
    NotAnOption {
        /// The input.
        name: String,
        /// What was given, described.
        got: String,
        /// The options.
        options: Vec<String>,
    },
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The `inputs` context: every declared input, in declaration order.
///
/// A given value (names compared case-insensitively, as the `inputs` context does) is
/// checked against the type: a boolean accepts `true`/`false` or the strings `"true"`
/// and `"false"`; a number accepts a number or a string that parses as one; a string,
/// choice or environment accepts a string (a choice only one of its options). Given
/// values may already be typed (`workflow_call`) or all strings (`workflow_dispatch`
/// from a command line); a `null` counts as not given.
///
/// Not given: the default (coerced the same way, except a string containing `${{`,
/// left as is); else an error if required; else GitHub's "If a `default` parameter is
/// not set, the default value of the input is `false` for a boolean, `0` for a number,
/// and `""` for a string" (and `""` for a choice or environment).
pub fn resolve_inputs(
    specs: &IndexMap<String, InputSpec>,
    given: &IndexMap<String, Value>,
) -> Result<Object, InputError> {
    reject_unknown(specs, given)?;
    let mut out = Object::new();
    for (name, spec) in specs {
        let value = match lookup(given, name) {
            Some(v) => coerce(name, &spec.kind, v)?,
            None => fallback(name, spec)?,
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

fn reject_unknown(
    specs: &IndexMap<String, InputSpec>,
    given: &IndexMap<String, Value>,
) -> Result<(), InputError> {
    match given
        .keys()
        .find(|g| !specs.keys().any(|s| s.eq_ignore_ascii_case(g)))
    {
        Some(name) => Err(InputError::Unknown {
            name: name.clone(),
            known: specs.keys().cloned().collect(),
        }),
        None => Ok(()),
    }
}

fn lookup<'a>(given: &'a IndexMap<String, Value>, name: &str) -> Option<&'a Value> {
    given
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !matches!(v, Value::Null))
}

fn fallback(name: &str, spec: &InputSpec) -> Result<Value, InputError> {
    match &spec.default {
        Some(Value::String(s)) if s.contains("${{") => Ok(Value::String(s.clone())),
        Some(d) if !matches!(d, Value::Null) => coerce(name, &spec.kind, d),
        _ if spec.required => Err(InputError::Missing {
            name: name.to_string(),
        }),
        _ => Ok(zero(&spec.kind)),
    }
}

fn zero(kind: &InputType) -> Value {
    match kind {
        InputType::Boolean => Value::Bool(false),
        InputType::Number => Value::Number(0.0),
        InputType::String | InputType::Choice(_) | InputType::Environment => Value::str(""),
    }
}

fn coerce(name: &str, kind: &InputType, v: &Value) -> Result<Value, InputError> {
    let type_error = |expected| InputError::Type {
        name: name.to_string(),
        expected,
        got: describe(v),
    };
    match (kind, v) {
        (InputType::Boolean, Value::Bool(b)) => Ok(Value::Bool(*b)),
        (InputType::Boolean, Value::String(s)) if s == "true" || s == "false" => {
            Ok(Value::Bool(s == "true"))
        }
        (InputType::Boolean, _) => Err(type_error("a boolean (`true` or `false`)")),
        (InputType::Number, Value::Number(n)) => Ok(Value::Number(*n)),
        (InputType::Number, Value::String(s)) => parse_number(s)
            .map(Value::Number)
            .ok_or_else(|| type_error("a number")),
        (InputType::Number, _) => Err(type_error("a number")),
        (InputType::String | InputType::Environment, Value::String(s)) => Ok(Value::str(s)),
        (InputType::String | InputType::Environment, _) => Err(type_error("a string")),
        (InputType::Choice(options), Value::String(s)) if options.contains(s) => Ok(Value::str(s)),
        (InputType::Choice(options), _) => Err(InputError::NotAnOption {
            name: name.to_string(),
            got: describe(v),
            options: options.clone(),
        }),
    }
}

/// A finite decimal number, surrounding blanks allowed (`inf` and `NaN` are not numbers
/// a user types into a number input).
fn parse_number(s: &str) -> Option<f64> {
    let t = s.trim();
    let numeric = t
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    t.parse::<f64>().ok().filter(|n| numeric && n.is_finite())
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {}", Value::Number(*n)),
        Value::String(s) => format!("`{s}`"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: InputType, required: bool, default: Option<Value>) -> InputSpec {
        InputSpec {
            description: None,
            required,
            default,
            kind,
        }
    }

    fn specs(items: &[(&str, InputSpec)]) -> IndexMap<String, InputSpec> {
        items
            .iter()
            .map(|(k, s)| (k.to_string(), s.clone()))
            .collect()
    }

    fn given(items: &[(&str, Value)]) -> IndexMap<String, Value> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn one(kind: InputType, v: Value) -> Result<Value, InputError> {
        let s = specs(&[("x", spec(kind, false, None))]);
        resolve_inputs(&s, &given(&[("x", v)])).map(|o| o.get("x").cloned().unwrap())
    }

    #[test]
    fn booleans_accept_true_and_false_only() {
        assert_eq!(
            one(InputType::Boolean, Value::str("true")),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            one(InputType::Boolean, Value::str("false")),
            Ok(Value::Bool(false))
        );
        assert_eq!(
            one(InputType::Boolean, Value::Bool(true)),
            Ok(Value::Bool(true))
        );
        let err = one(InputType::Boolean, Value::str("yes")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `x` must be a boolean (`true` or `false`), not `yes`"
        );
        assert!(one(InputType::Boolean, Value::Number(1.0)).is_err());
    }

    #[test]
    fn numbers_are_parsed_from_strings() {
        assert_eq!(
            one(InputType::Number, Value::str("3.5")),
            Ok(Value::Number(3.5))
        );
        assert_eq!(
            one(InputType::Number, Value::str(" -2e3 ")),
            Ok(Value::Number(-2000.0))
        );
        assert_eq!(
            one(InputType::Number, Value::Number(7.0)),
            Ok(Value::Number(7.0))
        );
        for bad in ["abc", "", "inf", "NaN", "1,5"] {
            let err = one(InputType::Number, Value::str(bad)).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("input `x` must be a number, not `{bad}`")
            );
        }
        assert!(one(InputType::Number, Value::Bool(true)).is_err());
    }

    #[test]
    fn strings_and_environments_take_strings_only() {
        assert_eq!(
            one(InputType::String, Value::str("a b")),
            Ok(Value::str("a b"))
        );
        assert_eq!(
            one(InputType::Environment, Value::str("prod")),
            Ok(Value::str("prod"))
        );
        let err = one(InputType::String, Value::Number(3.0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `x` must be a string, not the number 3"
        );
    }

    #[test]
    fn choices_must_be_one_of_the_options() {
        let kind = InputType::Choice(vec!["info".into(), "debug".into()]);
        assert_eq!(
            one(kind.clone(), Value::str("debug")),
            Ok(Value::str("debug"))
        );
        let err = one(kind, Value::str("trace")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `x` must be one of info, debug, not `trace`"
        );
    }

    #[test]
    fn unknown_inputs_are_errors_listing_the_declared_ones() {
        let s = specs(&[
            ("a", spec(InputType::String, false, None)),
            ("b", spec(InputType::String, false, None)),
        ]);
        let err = resolve_inputs(&s, &given(&[("x", Value::str("1"))])).unwrap_err();
        assert_eq!(err.to_string(), "unknown input `x` (inputs: a, b)");
        let err = resolve_inputs(&IndexMap::new(), &given(&[("x", Value::str("1"))]));
        assert_eq!(
            err.unwrap_err().to_string(),
            "unknown input `x` (inputs: none)"
        );
    }

    #[test]
    fn defaults_required_and_zero_values() {
        let s = specs(&[
            (
                "level",
                spec(InputType::String, true, Some(Value::str("warning"))),
            ),
            (
                "flag",
                spec(InputType::Boolean, false, Some(Value::str("true"))),
            ),
            (
                "expr",
                spec(
                    InputType::Number,
                    false,
                    Some(Value::str("${{ github.run_number }}")),
                ),
            ),
            ("b", spec(InputType::Boolean, false, None)),
            ("n", spec(InputType::Number, false, None)),
            ("s", spec(InputType::String, false, None)),
            ("c", spec(InputType::Choice(vec!["x".into()]), false, None)),
        ]);
        let out = resolve_inputs(&s, &IndexMap::new()).unwrap();
        let values: Vec<(&str, Value)> = out.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        assert_eq!(
            values,
            [
                ("level", Value::str("warning")),
                ("flag", Value::Bool(true)),
                ("expr", Value::str("${{ github.run_number }}")),
                ("b", Value::Bool(false)),
                ("n", Value::Number(0.0)),
                ("s", Value::str("")),
                ("c", Value::str("")),
            ]
        );
    }

    #[test]
    fn a_required_input_without_default_must_be_given() {
        let s = specs(&[("tags", spec(InputType::String, true, None))]);
        let err = resolve_inputs(&s, &IndexMap::new()).unwrap_err();
        assert_eq!(
            err,
            InputError::Missing {
                name: "tags".into()
            }
        );
        assert_eq!(err.to_string(), "input `tags` is required");
        // null counts as not given
        let err = resolve_inputs(&s, &given(&[("tags", Value::Null)])).unwrap_err();
        assert_eq!(
            err,
            InputError::Missing {
                name: "tags".into()
            }
        );
    }

    #[test]
    fn given_names_match_case_insensitively_and_keep_the_declared_name() {
        let s = specs(&[("logLevel", spec(InputType::String, true, None))]);
        let out = resolve_inputs(&s, &given(&[("LOGLEVEL", Value::str("debug"))])).unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), ["logLevel"]);
        assert_eq!(out.get("loglevel"), Some(&Value::str("debug")));
    }

    #[test]
    fn a_default_of_the_wrong_type_is_an_error() {
        let s = specs(&[(
            "flag",
            spec(InputType::Boolean, false, Some(Value::str("yes"))),
        )]);
        assert!(matches!(
            resolve_inputs(&s, &IndexMap::new()),
            Err(InputError::Type { .. })
        ));
    }
}
