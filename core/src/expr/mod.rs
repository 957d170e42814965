//! GitHub Actions expressions (`${{ }}`), evaluated on the host with GitHub's semantics.
//!
//! The host evaluates every expression of a workflow (job and step `if:`, `env:`,
//! `with:`, `run:`, matrix, outputs...) and hands act a fully resolved step. Parsing is
//! the `github-actions-expressions` crate's; evaluation is ours, over [`Value`].
//!
//! The reference is GitHub's documentation
//! (<https://docs.github.com/en/actions/reference/workflows-and-actions/expressions>)
//! and, where it is silent, the runner's evaluator (actions/runner
//! `src/Sdk/Expressions`) and its TypeScript mirror (actions/languageservices
//! `expressions/src`), whose upstream test suite the `conformance` test replays.
//!
//! Entry points: [`evaluate`] (a bare expression), [`condition`] (an `if:`),
//! [`interpolate`] / [`evaluate_template`] / [`interpolate_to_string`] (text with
//! `${{ }}` in it), [`referenced_contexts`] / [`expression_contexts`] (which contexts a
//! text reads, without evaluating) and [`has_expression`].
//!
//! One deliberate difference from GitHub: GitHub rejects a reference to an unknown
//! context when it parses the workflow; here it is an error only when evaluated, so the
//! side of `&&`/`||` that is not evaluated may name a context that is absent.

use std::collections::BTreeSet;

use github_actions_expressions::call::{self, Call};
use github_actions_expressions::{Expr, SpannedExpr};

use crate::value::{Object, Value};

mod eval;
mod functions;
mod template;
mod val;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use eval::Evaluator;
use template::Segment;

/// What an expression can read.
pub struct EvalEnv<'a> {
    /// Top-level contexts by name: github, env, vars, secrets, inputs, matrix, strategy,
    /// needs, steps, job, jobs, runner. Names absent here are an error when referenced
    /// ("unknown context `foo`"), a present context's missing property is null.
    pub contexts: &'a Object,
    /// Values of the status functions at this point.
    pub status: Status,
    /// hashFiles(); None = calling hashFiles is an error saying it is not available here.
    pub hash_files: Option<&'a dyn HashFiles>,
}

/// The values of `success()`, `failure()` and `cancelled()` (`always()` is always true).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub success: bool,
    pub failure: bool,
    pub cancelled: bool,
}

/// `hashFiles(patterns...)`: the caller hashes the workspace files the patterns match.
pub trait HashFiles {
    /// The hash (empty when nothing matches), or a message saying what went wrong.
    fn hash_files(&self, patterns: &[String]) -> Result<String, String>;
}

/// Why an expression could not be evaluated. Every message names the expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// The expression does not parse.
    #[error("invalid expression `{expr}`: {message} (at byte {offset})")]
    Syntax {
        expr: String,
        message: String,
        offset: usize,
    },
    /// A function GitHub does not have.
    #[error("`{expr}`: unknown function `{name}`")]
    UnknownFunction { expr: String, name: String },
    /// A context name that is not available here.
    #[error("`{expr}`: unknown context `{name}` (available here: {available})")]
    UnknownContext {
        expr: String,
        name: String,
        available: String,
    },
    /// A function was called wrongly or failed (bad arguments, invalid JSON, ...).
    #[error("`{expr}`: {function}: {message}")]
    Function {
        expr: String,
        function: String,
        message: String,
    },
    /// A `${{` without its `}}`.
    #[error("unterminated `${{{{` at byte {offset} of `{template}`: no closing `}}}}`")]
    Unterminated { template: String, offset: usize },
}

/// A piece of an interpolated template.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text outside `${{ }}`, verbatim.
    Text(String),
    /// One `${{ }}`: its expression (trimmed) and value.
    Expr { source: String, value: Value },
}

/// Evaluates `expr`, an expression without `${{ }}`.
pub fn evaluate(expr: &str, env: &EvalEnv) -> Result<Value, ExprError> {
    let expr = expr.trim();
    let ast = parse(expr)?;
    Ok(Evaluator { env, source: expr }.eval(&ast)?.into_value())
}

/// An `if:` as GitHub reads it: with or without ${{ }}; when the expression calls none of
/// success()/failure()/always()/cancelled(), it is `success() && (expr)`.
///
/// An empty condition is `success()`. Text around or between several `${{ }}` makes
/// the condition a string (GitHub turns it into `format(...)`), true unless empty.
pub fn condition(text: &str, env: &EvalEnv) -> Result<bool, ExprError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(env.status.success);
    }
    if !has_expression(text) {
        return expression_condition(text, env);
    }
    let segments = template::scan(text)?;
    if let Some(expr) = template::single_expression(&segments) {
        return expression_condition(expr.trim(), env);
    }
    let mut has_status = false;
    for segment in &segments {
        if let Segment::Expr(e) = segment {
            has_status |= calls_status_function(&parse(e.trim())?);
        }
    }
    if !has_status && !env.status.success {
        return Ok(false);
    }
    Ok(!interpolate_to_string(text, env)?.is_empty())
}

fn expression_condition(expr: &str, env: &EvalEnv) -> Result<bool, ExprError> {
    let ast = parse(expr)?;
    // The implicit `success() && (...)`: when it fails, `(...)` is not evaluated.
    if !calls_status_function(&ast) && !env.status.success {
        return Ok(false);
    }
    Ok(Evaluator { env, source: expr }.eval(&ast)?.truthy())
}

/// A template: literal text with ${{ }} occurrences.
pub fn interpolate(template: &str, env: &EvalEnv) -> Result<Vec<Piece>, ExprError> {
    template::scan(template)?
        .into_iter()
        .map(|segment| match segment {
            Segment::Text(t) => Ok(Piece::Text(t.to_string())),
            Segment::Expr(e) => Ok(Piece::Expr {
                source: e.trim().to_string(),
                value: evaluate(e, env)?,
            }),
        })
        .collect()
}

/// Whole-string value: if the template is exactly one ${{ expr }} (surrounding
/// whitespace allowed) the result keeps its type (needed for matrix, continue-on-error,
/// timeout-minutes, with: of reusable workflows); otherwise the string of all pieces.
pub fn evaluate_template(template: &str, env: &EvalEnv) -> Result<Value, ExprError> {
    let segments = template::scan(template)?;
    match template::single_expression(&segments) {
        Some(expr) => evaluate(expr, env),
        None => interpolate_to_string(template, env).map(Value::String),
    }
}

/// The template with every `${{ }}` replaced by its value's string form (null is '').
pub fn interpolate_to_string(template: &str, env: &EvalEnv) -> Result<String, ExprError> {
    let mut out = String::with_capacity(template.len());
    for piece in interpolate(template, env)? {
        match piece {
            Piece::Text(t) => out.push_str(&t),
            Piece::Expr { value, .. } => out.push_str(&value.to_string()),
        }
    }
    Ok(out)
}

/// The top-level context names (lower-cased) a template's `${{ }}` expressions refer
/// to, without evaluating; text without `${{` refers to none. For a bare expression
/// (an `if:` written without `${{ }}`), use [`expression_contexts`].
pub fn referenced_contexts(template: &str) -> Result<BTreeSet<String>, ExprError> {
    let mut names = BTreeSet::new();
    for segment in template::scan(template)? {
        if let Segment::Expr(e) = segment {
            names.extend(expression_contexts(e)?);
        }
    }
    Ok(names)
}

/// The top-level context names (lower-cased) a bare expression refers to.
pub fn expression_contexts(expr: &str) -> Result<BTreeSet<String>, ExprError> {
    let expr = expr.trim();
    let ast = parse(expr)?;
    Ok(ast
        .contexts()
        .into_iter()
        .filter_map(|(ctx, _)| match &ctx.parts.first()?.inner {
            Expr::Identifier(name) => Some(name.as_str().to_ascii_lowercase()),
            _ => None,
        })
        .collect())
}

/// Does the text contain a `${{`? (cheap check)
pub fn has_expression(text: &str) -> bool {
    text.contains("${{")
}

/// Parses `expr` (trimmed by the caller), naming it in errors.
fn parse(expr: &str) -> Result<SpannedExpr<'_>, ExprError> {
    use github_actions_expressions::Error as E;
    Expr::parse(expr).map_err(|e| match e {
        E::Syntax(s) => ExprError::Syntax {
            expr: expr.to_string(),
            message: s.message.to_string(),
            offset: s.offset,
        },
        E::Depth => ExprError::Syntax {
            expr: expr.to_string(),
            message: "nested too deeply (GitHub's limit is 50 levels)".to_string(),
            offset: 0,
        },
        E::Call(call::Error::UnknownFunction(name)) => ExprError::UnknownFunction {
            expr: expr.to_string(),
            name,
        },
        E::Call(call::Error::Arity(f, expected)) => ExprError::Function {
            expr: expr.to_string(),
            function: functions::name(f).to_string(),
            message: format!("takes {expected}"),
        },
    })
}

/// Does the expression call success(), failure(), always() or cancelled() anywhere?
fn calls_status_function(e: &SpannedExpr<'_>) -> bool {
    match &e.inner {
        Expr::Call(Call { func, args }) => {
            functions::is_status(*func) || args.iter().any(calls_status_function)
        }
        Expr::BinExpr(b) => calls_status_function(&b.lhs) || calls_status_function(&b.rhs),
        Expr::UnExpr { expr, .. } => calls_status_function(expr),
        Expr::Context(ctx) => ctx.parts.iter().any(calls_status_function),
        Expr::Index(inner) => calls_status_function(inner),
        Expr::Literal(_) | Expr::Identifier(_) | Expr::Star => false,
    }
}
