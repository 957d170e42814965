//! What an expression computes with: values borrowed from the contexts or made by the
//! expression, the results of `*` filters, and GitHub's coercion and comparison rules.
//!
//! Sources for the rules: the expressions documentation ("Operators", "Functions") and
//! the runner's evaluator (actions/runner `src/Sdk/Expressions`, mirrored by
//! actions/languageservices `expressions/src`): `ExpressionUtility.ParseNumber`,
//! `Operators/Index.cs`, and `result.ts` (`coerceTypes`, `equals`, `greaterThan`,
//! `toUpperSpecial`).

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::value::{format_number, Value};

/// A value during evaluation.
#[derive(Debug)]
pub(crate) enum Val<'a> {
    /// A value inside the contexts. Its address is its identity: GitHub compares arrays
    /// and objects by instance, so `github.event == github.event` is true.
    Shared(&'a Value),
    /// A value the expression made (literals, function results): equal to no other
    /// array or object.
    Owned(Value),
    /// The result of a `*` filter. Its items are never themselves `Filtered`; further
    /// property and index accesses apply to every item (see [`Val::access`]).
    Filtered(Vec<Val<'a>>),
}

/// A value as operators and functions see it: its kind, and for arrays and objects
/// their identity when they live in the contexts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operand<'v> {
    Null,
    Bool(bool),
    Number(f64),
    String(&'v str),
    Array(Option<&'v Value>),
    Object(Option<&'v Value>),
}

impl<'v> Operand<'v> {
    /// `value`'s operand; `shared` says whether it lives in the contexts.
    pub(crate) fn of(value: &'v Value, shared: bool) -> Operand<'v> {
        let identity = shared.then_some(value);
        match value {
            Value::Null => Operand::Null,
            Value::Bool(b) => Operand::Bool(*b),
            Value::Number(n) => Operand::Number(*n),
            Value::String(s) => Operand::String(s),
            Value::Array(_) => Operand::Array(identity),
            Value::Object(_) => Operand::Object(identity),
        }
    }

    /// Null, booleans, numbers and strings.
    pub(crate) fn is_primitive(self) -> bool {
        !matches!(self, Operand::Array(_) | Operand::Object(_))
    }

    /// GitHub's number conversion: null 0, booleans 0/1, strings parsed, else NaN.
    pub(crate) fn to_number(self) -> f64 {
        match self {
            Operand::Null => 0.0,
            Operand::Bool(b) => f64::from(u8::from(b)),
            Operand::Number(n) => n,
            Operand::String(s) => parse_number(s),
            Operand::Array(_) | Operand::Object(_) => f64::NAN,
        }
    }

    /// GitHub's string conversion (the form `${{ }}` inserts).
    pub(crate) fn to_display(self) -> Cow<'v, str> {
        match self {
            Operand::Null => Cow::Borrowed(""),
            Operand::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
            Operand::Number(n) => Cow::Owned(format_number(n)),
            Operand::String(s) => Cow::Borrowed(s),
            Operand::Array(_) => Cow::Borrowed("Array"),
            Operand::Object(_) => Cow::Borrowed("Object"),
        }
    }

    pub(crate) fn truthy(self) -> bool {
        match self {
            Operand::Null => false,
            Operand::Bool(b) => b,
            Operand::Number(n) => n != 0.0 && !n.is_nan(),
            Operand::String(s) => !s.is_empty(),
            Operand::Array(_) | Operand::Object(_) => true,
        }
    }
}

/// GitHub's loose comparison: `Some(Equal)` is `==`, and `<`, `>` are `Some(Less)`,
/// `Some(Greater)`. Values of different kinds compare as numbers; arrays and objects
/// compare with nothing but themselves (by instance); strings compare upper-cased and
/// ordinally; NaN compares with nothing.
pub(crate) fn loose_cmp(a: Operand<'_>, b: Operand<'_>) -> Option<Ordering> {
    use Operand as O;
    match (a, b) {
        (O::Null, O::Null) => Some(Ordering::Equal),
        (O::Bool(x), O::Bool(y)) => Some(x.cmp(&y)),
        (O::Number(x), O::Number(y)) => x.partial_cmp(&y),
        (O::String(x), O::String(y)) => Some(cmp_ignore_case(x, y)),
        (O::Array(Some(x)), O::Array(Some(y))) | (O::Object(Some(x)), O::Object(Some(y)))
            if std::ptr::eq(x, y) =>
        {
            Some(Ordering::Equal)
        }
        _ if a.is_primitive() && b.is_primitive() => a.to_number().partial_cmp(&b.to_number()),
        _ => None,
    }
}

/// `==` as GitHub evaluates it.
pub(crate) fn loose_eq(a: Operand<'_>, b: Operand<'_>) -> bool {
    loose_cmp(a, b) == Some(Ordering::Equal)
}

/// Ordinal comparison of the upper-cased strings, by UTF-16 code unit as the runner
/// (C#) and languageservices (JavaScript) compare.
fn cmp_ignore_case(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    upper_special(a)
        .encode_utf16()
        .cmp(upper_special(b).encode_utf16())
}

/// Upper-cases `s` as GitHub does for case-insensitive comparison: every character
/// except the dotless `ı`, which would otherwise become `I` (languageservices
/// `toUpperSpecial`, matching the runner's ordinal-ignore-case).
pub(crate) fn upper_special(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == 'ı' {
            out.push(c);
        } else {
            out.extend(c.to_uppercase());
        }
    }
    out
}

/// The runner's string-to-number conversion (`ExpressionUtility.ParseNumber`): trimmed;
/// empty is 0; a decimal number with optional sign, point and exponent; `0x` followed by
/// at most 32 bits of hex and `0o` by octal (both two's-complement `Int32`); `Infinity`
/// with optional sign; anything else NaN.
pub(crate) fn parse_number(s: &str) -> f64 {
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if t.is_empty() {
        return 0.0;
    }
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    if unsigned.eq_ignore_ascii_case("infinity") {
        return if t.starts_with('-') {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
    }
    if let Some(hex) = t.strip_prefix("0x") {
        return radix_i32(hex, 16);
    }
    if let Some(oct) = t.strip_prefix("0o") {
        return radix_i32(oct, 8);
    }
    // Rust's grammar also takes `inf` and `nan`: only digits and `.` may start the number.
    if unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        if let Ok(n) = t.parse::<f64>() {
            return n;
        }
    }
    f64::NAN
}

/// `digits` in `radix` as a 32-bit two's-complement integer, or NaN.
fn radix_i32(digits: &str, radix: u32) -> f64 {
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return f64::NAN;
    }
    match u32::from_str_radix(digits, radix) {
        // The runner parses into an Int32: 0xFFFFFFFF is -1.
        Ok(n) => f64::from(n as i32),
        Err(_) => f64::NAN,
    }
}

/// An index as the runner's `IndexHelper` reads it: a string key when the index is a
/// primitive, an array position when it is a finite number ≥ 0 (floored) within `Int32`.
pub(crate) struct Key {
    name: Option<String>,
    position: Option<usize>,
}

impl Key {
    pub(crate) fn of(index: Operand<'_>) -> Key {
        let name = index
            .is_primitive()
            .then(|| index.to_display().into_owned());
        let n = index.to_number();
        let position = (n >= 0.0 && n.floor() <= f64::from(i32::MAX)).then(|| n.floor() as usize);
        Key { name, position }
    }
}

impl<'a> Val<'a> {
    pub(crate) fn operand(&self) -> Operand<'_> {
        match self {
            Val::Shared(v) => Operand::of(v, true),
            Val::Owned(v) => Operand::of(v, false),
            Val::Filtered(_) => Operand::Array(None),
        }
    }

    pub(crate) fn truthy(&self) -> bool {
        self.operand().truthy()
    }

    /// The value, copied out of the contexts if it lives there.
    pub(crate) fn into_value(self) -> Value {
        match self {
            Val::Shared(v) => v.clone(),
            Val::Owned(v) => v,
            Val::Filtered(items) => Value::Array(items.into_iter().map(Val::into_value).collect()),
        }
    }

    /// The value, borrowed where possible.
    pub(crate) fn as_value(&self) -> Cow<'_, Value> {
        match self {
            Val::Shared(v) => Cow::Borrowed(v),
            Val::Owned(v) => Cow::Borrowed(v),
            Val::Filtered(items) => Cow::Owned(Value::Array(
                items.iter().map(|i| i.as_value().into_owned()).collect(),
            )),
        }
    }

    /// The elements, if this is an array (a filter result included).
    pub(crate) fn elements(&self) -> Option<Vec<Operand<'_>>> {
        match self {
            Val::Shared(Value::Array(a)) => Some(a.iter().map(|v| Operand::of(v, true)).collect()),
            Val::Owned(Value::Array(a)) => Some(a.iter().map(|v| Operand::of(v, false)).collect()),
            Val::Filtered(items) => Some(items.iter().map(Val::operand).collect()),
            _ => None,
        }
    }

    /// `self[key]` and `self.key`: an object's property (case-insensitive) or an array's
    /// element, else null. On a filter result it applies to every item and keeps only
    /// the items that have it (runner `Index.HandleFilteredArray`; languageservices
    /// `filteredArrayAccess`): `labels.*.name` lists the labels that have a name.
    pub(crate) fn access(self, key: &Key) -> Val<'a> {
        match self {
            Val::Filtered(items) => {
                Val::Filtered(items.into_iter().filter_map(|i| i.child(key)).collect())
            }
            other => other.child(key).unwrap_or(Val::Owned(Value::Null)),
        }
    }

    /// `self.*` / `self[*]`: an object's values or an array's elements, as a filter
    /// result; on a filter result, every item's values or elements, flattened (items
    /// that are neither are dropped); on anything else, an empty filter result.
    pub(crate) fn star(self) -> Val<'a> {
        match self {
            Val::Filtered(items) => {
                Val::Filtered(items.into_iter().flat_map(Val::children).collect())
            }
            other => Val::Filtered(other.children()),
        }
    }

    fn child(self, key: &Key) -> Option<Val<'a>> {
        match self {
            Val::Shared(Value::Object(o)) => {
                key.name.as_deref().and_then(|k| o.get(k)).map(Val::Shared)
            }
            Val::Shared(Value::Array(a)) => key.position.and_then(|i| a.get(i)).map(Val::Shared),
            Val::Owned(Value::Object(mut o)) => key
                .name
                .as_deref()
                .and_then(|k| o.remove(k))
                .map(Val::Owned),
            Val::Owned(Value::Array(mut a)) => key
                .position
                .filter(|&i| i < a.len())
                .map(|i| Val::Owned(a.swap_remove(i))),
            _ => None,
        }
    }

    fn children(self) -> Vec<Val<'a>> {
        match self {
            Val::Shared(Value::Object(o)) => o.values().map(Val::Shared).collect(),
            Val::Shared(Value::Array(a)) => a.iter().map(Val::Shared).collect(),
            Val::Owned(Value::Object(o)) => o.values().cloned().map(Val::Owned).collect(),
            Val::Owned(Value::Array(a)) => a.into_iter().map(Val::Owned).collect(),
            _ => Vec::new(),
        }
    }
}
