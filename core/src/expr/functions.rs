//! The built-in functions. Each follows the runner's implementation
//! (actions/runner `src/Sdk/Expressions/Sdk/Functions`), including which arguments it
//! evaluates: `case` evaluates only the branch it returns, `format` only the arguments
//! its format string references, and `contains`/`startsWith`/`endsWith` skip the second
//! argument when the first is not a primitive.

use github_actions_expressions::call::{Call, Function};
use github_actions_expressions::SpannedExpr;

use super::eval::Evaluator;
use super::val::{loose_eq, upper_special, Operand, Val};
use super::ExprError;
use crate::value::Value;

type Result<T> = std::result::Result<T, ExprError>;

/// GitHub's spelling of a function's name, for messages.
pub(crate) fn name(f: Function) -> &'static str {
    match f {
        Function::Contains => "contains",
        Function::StartsWith => "startsWith",
        Function::EndsWith => "endsWith",
        Function::Format => "format",
        Function::Join => "join",
        Function::ToJSON => "toJSON",
        Function::FromJSON => "fromJSON",
        Function::HashFiles => "hashFiles",
        Function::Case => "case",
        Function::Success => "success",
        Function::Always => "always",
        Function::Cancelled => "cancelled",
        Function::Failure => "failure",
    }
}

/// Is `f` one of the status functions that stop `if:` from adding `success() &&`?
pub(crate) fn is_status(f: Function) -> bool {
    matches!(
        f,
        Function::Success | Function::Always | Function::Cancelled | Function::Failure
    )
}

/// Evaluates `call`. The parser has checked the name and the number of arguments.
pub(crate) fn call<'a>(ev: &Evaluator<'_, 'a>, call: &Call<'_>) -> Result<Val<'a>> {
    let args = &call.args;
    let status = ev.env.status;
    let value = match call.func {
        Function::Contains => Value::Bool(contains(ev, args)?),
        Function::StartsWith => Value::Bool(affix(ev, args, |s, p| s.starts_with(p))?),
        Function::EndsWith => Value::Bool(affix(ev, args, |s, p| s.ends_with(p))?),
        Function::Format => Value::String(format(ev, args)?),
        Function::Join => Value::String(join(ev, args)?),
        Function::ToJSON => Value::String(to_json(ev, &ev.eval(&args[0])?)?),
        Function::FromJSON => from_json(ev, &ev.eval(&args[0])?)?,
        Function::HashFiles => Value::String(hash_files(ev, args)?),
        Function::Case => return case(ev, args),
        Function::Success => Value::Bool(status.success),
        Function::Failure => Value::Bool(status.failure),
        Function::Cancelled => Value::Bool(status.cancelled),
        Function::Always => Value::Bool(true),
    };
    Ok(Val::Owned(value))
}

/// `contains(search, item)`: a case-insensitive substring test on primitives, loose
/// equality with any element on arrays, false otherwise.
fn contains(ev: &Evaluator<'_, '_>, args: &[SpannedExpr<'_>]) -> Result<bool> {
    let search = ev.eval(&args[0])?;
    if search.operand().is_primitive() {
        let item = ev.eval(&args[1])?;
        if !item.operand().is_primitive() {
            return Ok(false);
        }
        let haystack = upper_special(&search.operand().to_display());
        return Ok(haystack.contains(&upper_special(&item.operand().to_display())));
    }
    match search.elements() {
        Some(elements) if !elements.is_empty() => {
            let item = ev.eval(&args[1])?;
            Ok(elements.into_iter().any(|e| loose_eq(item.operand(), e)))
        }
        _ => Ok(false),
    }
}

/// `startsWith` / `endsWith`: case-insensitive on the string forms of two primitives.
fn affix(
    ev: &Evaluator<'_, '_>,
    args: &[SpannedExpr<'_>],
    test: fn(&str, &str) -> bool,
) -> Result<bool> {
    let subject = ev.eval(&args[0])?;
    if !subject.operand().is_primitive() {
        return Ok(false);
    }
    let affix = ev.eval(&args[1])?;
    if !affix.operand().is_primitive() {
        return Ok(false);
    }
    let s = upper_special(&subject.operand().to_display());
    Ok(test(&s, &upper_special(&affix.operand().to_display())))
}

/// `join(array, separator)`: the elements' string forms joined by the separator (`,`
/// when absent or not a primitive); a primitive is its own string form; anything else
/// is `''`.
fn join(ev: &Evaluator<'_, '_>, args: &[SpannedExpr<'_>]) -> Result<String> {
    let items = ev.eval(&args[0])?;
    if let Some(elements) = items.elements() {
        if elements.len() < 2 {
            return Ok(elements
                .first()
                .map(|e| e.to_display().into_owned())
                .unwrap_or_default());
        }
        let separator = match args.get(1) {
            Some(arg) => {
                let sep = ev.eval(arg)?;
                let op = sep.operand();
                if op.is_primitive() {
                    op.to_display().into_owned()
                } else {
                    ",".into()
                }
            }
            None => ",".into(),
        };
        let strings: Vec<_> = elements.iter().map(|e| e.to_display()).collect();
        return Ok(strings.join(&separator));
    }
    let op = items.operand();
    Ok(if op.is_primitive() {
        op.to_display().into_owned()
    } else {
        String::new()
    })
}

/// `toJSON(value)`: pretty-printed, two-space indentation, keys in their order.
fn to_json(ev: &Evaluator<'_, '_>, arg: &Val<'_>) -> Result<String> {
    // Through `Value`'s own `Serialize`, which keeps key order (serde_json's map,
    // which `Value::to_json_pretty` goes through, sorts keys).
    serde_json::to_string_pretty(&*arg.as_value())
        .map_err(|e| ev.function_error("toJSON", e.to_string()))
}

/// `fromJSON(text)`: the text's JSON value; empty or invalid JSON is an error.
fn from_json(ev: &Evaluator<'_, '_>, arg: &Val<'_>) -> Result<Value> {
    let text = arg.operand().to_display();
    if text.trim().is_empty() {
        return Err(ev.function_error("fromJSON", "empty input, expected JSON"));
    }
    Value::from_json_str(&text).map_err(|e| {
        ev.function_error(
            "fromJSON",
            format!("invalid JSON ({e}) in {}", quote(&text)),
        )
    })
}

fn hash_files(ev: &Evaluator<'_, '_>, args: &[SpannedExpr<'_>]) -> Result<String> {
    let Some(hasher) = ev.env.hash_files else {
        return Err(ev.function_error("hashFiles", "not available here"));
    };
    let mut patterns = Vec::with_capacity(args.len());
    for arg in args {
        patterns.push(ev.eval(arg)?.operand().to_display().into_owned());
    }
    hasher
        .hash_files(&patterns)
        .map_err(|e| ev.function_error("hashFiles", e))
}

/// `case(pred1, val1, ..., default)`: the value after the first true predicate, else
/// the default. Predicates must be booleans.
fn case<'a>(ev: &Evaluator<'_, 'a>, args: &[SpannedExpr<'_>]) -> Result<Val<'a>> {
    let (default, pairs) = args
        .split_last()
        .expect("the parser requires 3 or more arguments");
    for pair in pairs.chunks(2) {
        let [predicate, value] = pair else {
            unreachable!("the parser requires an odd number of arguments")
        };
        match ev.eval(predicate)?.operand() {
            Operand::Bool(true) => return ev.eval(value),
            Operand::Bool(false) => {}
            _ => {
                let message = format!("predicate `{}` is not a boolean", predicate.origin.raw);
                return Err(ev.function_error("case", message));
            }
        }
    }
    ev.eval(default)
}

/// A piece of a parsed format string.
enum Segment {
    Text(String),
    Arg(usize),
}

/// `format(string, args...)`: `{N}` is the N-th argument's string form, `{{` and `}}`
/// are literal braces. The runner rejects format specifiers (`{0:x}`), stray braces and
/// references past the last argument, and evaluates only the arguments referenced.
fn format(ev: &Evaluator<'_, '_>, args: &[SpannedExpr<'_>]) -> Result<String> {
    let fmt = ev.eval(&args[0])?.operand().to_display().into_owned();
    let segments = parse_format(&fmt, args.len() - 1)
        .map_err(|message| ev.function_error("format", message))?;
    let mut cache: Vec<Option<String>> = vec![None; args.len() - 1];
    let mut out = String::with_capacity(fmt.len());
    for segment in segments {
        match segment {
            Segment::Text(t) => out.push_str(&t),
            Segment::Arg(i) => {
                if cache[i].is_none() {
                    cache[i] = Some(ev.eval(&args[i + 1])?.operand().to_display().into_owned());
                }
                out.push_str(cache[i].as_deref().unwrap_or_default());
            }
        }
    }
    Ok(out)
}

/// Splits a format string as the runner's `Format.EvaluateCore` scans it.
fn parse_format(fmt: &str, arg_count: usize) -> std::result::Result<Vec<Segment>, String> {
    let bytes = fmt.as_bytes();
    let invalid = || format!("invalid format string {}", quote(fmt));
    let find = |b: u8, from: usize| bytes[from..].iter().position(|&c| c == b).map(|p| p + from);
    let mut segments = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let (lbrace, rbrace) = (find(b'{', i), find(b'}', i));
        match (lbrace, rbrace) {
            (Some(l), r) if r.is_none_or(|r| r > l) => {
                if bytes.get(l + 1) == Some(&b'{') {
                    text.push_str(&fmt[i..=l]);
                    i = l + 2;
                    continue;
                }
                let (index, close) = read_placeholder(fmt, l).ok_or_else(invalid)??;
                if index >= arg_count {
                    return Err(format!(
                        "format string {} references argument {index} but {arg_count} were given",
                        quote(fmt)
                    ));
                }
                text.push_str(&fmt[i..l]);
                segments.push(Segment::Text(std::mem::take(&mut text)));
                segments.push(Segment::Arg(index));
                i = close + 1;
            }
            (_, Some(r)) if bytes.get(r + 1) == Some(&b'}') => {
                text.push_str(&fmt[i..=r]);
                i = r + 2;
            }
            (_, Some(_)) => return Err(invalid()),
            (_, None) => {
                text.push_str(&fmt[i..]);
                break;
            }
        }
    }
    segments.push(Segment::Text(text));
    Ok(segments)
}

/// Reads `{N}` or `{N:specifiers}` at `open`: the argument index (0..=255, as the
/// runner parses it into a byte) and the closing brace's position. `None` when
/// malformed; `Some(Err)` for specifiers, which the runner rejects for every value.
fn read_placeholder(fmt: &str, open: usize) -> Option<std::result::Result<(usize, usize), String>> {
    let bytes = fmt.as_bytes();
    let digits = bytes[open + 1..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let index: u8 = fmt.get(open + 1..open + 1 + digits)?.parse().ok()?;
    let after = open + 1 + digits;
    match bytes.get(after) {
        Some(b'}') => Some(Ok((usize::from(index), after))),
        Some(b':') => {
            let close = specifiers_end(bytes, after + 1)?;
            let spec = fmt[after + 1..close].replace("}}", "}");
            Some(Err(format!(
                "format specifier `{spec}` in {} is not supported",
                quote(fmt)
            )))
        }
        _ => None,
    }
}

/// The position of the `}` closing specifiers that start at `from` (`}}` is escaped).
fn specifiers_end(bytes: &[u8], mut from: usize) -> Option<usize> {
    loop {
        match bytes.get(from)? {
            b'}' if bytes.get(from + 1) == Some(&b'}') => from += 2,
            b'}' => return Some(from),
            _ => from += 1,
        }
    }
}

/// `text` in single quotes, shortened for messages.
fn quote(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("'{}…'", &text[..cut]),
        None => format!("'{text}'"),
    }
}
