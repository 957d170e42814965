//! SHIM until the event/matrix branch lands.
#![allow(missing_docs, unused_variables)]
use crate::value::{Object, Value};
#[derive(Debug, Clone, PartialEq)]
pub struct Leg {
    pub values: Object,
}
#[derive(Debug, Clone, thiserror::Error)]
#[error("shim")]
pub struct MatrixError;
pub fn expand(matrix: &Value) -> Result<Vec<Leg>, MatrixError> {
    Err(MatrixError)
}
pub fn filter(legs: Vec<Leg>, picks: &[(String, String)]) -> Vec<Leg> {
    legs
}
pub fn leg_name(job_name: &str, leg: &Leg) -> String {
    job_name.into()
}
