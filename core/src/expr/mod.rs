//! SHIM until the expressions branch lands: the briefed API, no implementation.
#![allow(missing_docs, unused_variables)]
use std::collections::BTreeSet;

use crate::value::{Object, Value};

pub struct EvalEnv<'a> {
    pub contexts: &'a Object,
    pub status: Status,
    pub hash_files: Option<&'a dyn HashFiles>,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub success: bool,
    pub failure: bool,
    pub cancelled: bool,
}
pub trait HashFiles {
    fn hash_files(&self, patterns: &[String]) -> Result<String, String>;
}
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExprError {
    #[error("shim: {0}")]
    Shim(String),
}
pub fn evaluate(expr: &str, env: &EvalEnv) -> Result<Value, ExprError> {
    Err(ExprError::Shim(expr.into()))
}
pub fn condition(text: &str, env: &EvalEnv) -> Result<bool, ExprError> {
    Err(ExprError::Shim(text.into()))
}
pub enum Piece {
    Text(String),
    Expr { source: String, value: Value },
}
pub fn interpolate(template: &str, env: &EvalEnv) -> Result<Vec<Piece>, ExprError> {
    Err(ExprError::Shim(template.into()))
}
pub fn evaluate_template(template: &str, env: &EvalEnv) -> Result<Value, ExprError> {
    Err(ExprError::Shim(template.into()))
}
pub fn interpolate_to_string(template: &str, env: &EvalEnv) -> Result<String, ExprError> {
    Err(ExprError::Shim(template.into()))
}
pub fn referenced_contexts(template: &str) -> Result<BTreeSet<String>, ExprError> {
    Err(ExprError::Shim(template.into()))
}
pub fn has_expression(text: &str) -> bool {
    text.contains("${{")
}
