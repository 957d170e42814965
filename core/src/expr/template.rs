//! Finding the `${{ }}` expressions of a template.
//!
//! The scan follows GitHub's template reader (languageservices
//! `workflow-parser/src/templates/template-reader.ts`, `parseScalar`): after `${{`, the
//! expression ends at the first `}}` outside a single-quoted string literal, so
//! `${{ '}}' }}` is one expression. Text between expressions is kept verbatim.

use super::ExprError;

/// A piece of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Segment<'t> {
    /// Literal text.
    Text(&'t str),
    /// The text between `${{` and `}}`, untrimmed.
    Expr(&'t str),
}

const OPEN: &str = "${{";

/// Splits `template` into text and expressions; an unclosed `${{` is an error.
pub(crate) fn scan(template: &str) -> Result<Vec<Segment<'_>>, ExprError> {
    let mut segments = Vec::new();
    let mut rest = 0;
    while let Some(found) = template[rest..].find(OPEN) {
        let open = rest + found;
        if open > rest {
            segments.push(Segment::Text(&template[rest..open]));
        }
        let body = open + OPEN.len();
        let close =
            closing_braces(template.as_bytes(), body).ok_or_else(|| ExprError::Unterminated {
                template: template.to_string(),
                offset: open,
            })?;
        segments.push(Segment::Expr(&template[body..close]));
        rest = close + 2;
    }
    if rest < template.len() {
        segments.push(Segment::Text(&template[rest..]));
    }
    Ok(segments)
}

/// The position of the `}}` that ends an expression starting at `from`.
fn closing_braces(bytes: &[u8], from: usize) -> Option<usize> {
    let mut in_string = false;
    for i in from..bytes.len() {
        match bytes[i] {
            // `''` (an escaped quote) toggles twice: still inside the literal.
            b'\'' => in_string = !in_string,
            b'}' if !in_string && i > from && bytes[i - 1] == b'}' => return Some(i - 1),
            _ => {}
        }
    }
    None
}

/// The expression when the template is exactly one `${{ }}`, with only whitespace
/// around it.
pub(crate) fn single_expression<'t>(segments: &[Segment<'t>]) -> Option<&'t str> {
    let mut found = None;
    for segment in segments {
        match segment {
            Segment::Text(t) if t.trim().is_empty() => {}
            Segment::Text(_) => return None,
            Segment::Expr(e) if found.is_none() => found = Some(*e),
            Segment::Expr(_) => return None,
        }
    }
    found
}
