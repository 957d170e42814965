//! The evaluator: walks the parser's AST over the contexts of an [`EvalEnv`].

use github_actions_expressions::context::Context;
use github_actions_expressions::literal::Literal;
use github_actions_expressions::op::{BinExpr, BinOp, UnOp};
use github_actions_expressions::{Expr, SpannedExpr};

use std::cmp::Ordering;

use super::val::{loose_cmp, Key, Operand, Val};
use super::{functions, EvalEnv, ExprError};
use crate::value::Value;

/// Evaluates one parsed expression; `source` is its text, for error messages.
pub(crate) struct Evaluator<'e, 'a> {
    pub(crate) env: &'e EvalEnv<'a>,
    pub(crate) source: &'e str,
}

impl<'e, 'a> Evaluator<'e, 'a> {
    pub(crate) fn eval(&self, e: &SpannedExpr<'_>) -> Result<Val<'a>, ExprError> {
        match &e.inner {
            Expr::Literal(l) => Ok(Val::Owned(literal(l))),
            Expr::BinExpr(b) => self.binary(b),
            Expr::UnExpr {
                op: UnOp::Not,
                expr,
            } => Ok(boolean(!self.eval(expr)?.truthy())),
            Expr::Call(call) => functions::call(self, call),
            Expr::Context(ctx) => self.context(ctx),
            // The parser only produces these as parts of a context.
            Expr::Identifier(_) | Expr::Star | Expr::Index(_) => {
                Err(self.syntax(e, "a property, index or `*` outside of an access"))
            }
        }
    }

    /// `&&` and `||` return an operand and do not evaluate their right side when the
    /// left decides; the comparisons return booleans.
    fn binary(&self, b: &BinExpr<'_>) -> Result<Val<'a>, ExprError> {
        let lhs = self.eval(&b.lhs)?;
        match &b.op {
            BinOp::And if !lhs.truthy() => Ok(lhs),
            BinOp::Or if lhs.truthy() => Ok(lhs),
            BinOp::And | BinOp::Or => self.eval(&b.rhs),
            op => {
                let rhs = self.eval(&b.rhs)?;
                Ok(boolean(compare(op, lhs.operand(), rhs.operand())))
            }
        }
    }

    /// `head.part[part].*...`: the head is a context name, a call or a parenthesized
    /// expression; each part is applied in turn.
    fn context(&self, ctx: &Context<'_>) -> Result<Val<'a>, ExprError> {
        let Some((head, parts)) = ctx.parts.split_first() else {
            return Ok(Val::Owned(Value::Null));
        };
        let mut current = match &head.inner {
            Expr::Identifier(name) => self.named_context(name.as_str())?,
            _ => self.eval(head)?,
        };
        for part in parts {
            current = match &part.inner {
                Expr::Identifier(name) => current.access(&Key::of(Operand::String(name.as_str()))),
                Expr::Star => current.star(),
                Expr::Index(index) if matches!(index.inner, Expr::Star) => current.star(),
                Expr::Index(index) => {
                    let key = Key::of(self.eval(index)?.operand());
                    current.access(&key)
                }
                _ => return Err(self.syntax(part, "an unexpected access")),
            };
        }
        Ok(current)
    }

    fn named_context(&self, name: &str) -> Result<Val<'a>, ExprError> {
        let contexts = self.env.contexts;
        contexts
            .get(name)
            .map(Val::Shared)
            .ok_or_else(|| ExprError::UnknownContext {
                expr: self.source.to_string(),
                name: name.to_string(),
                available: contexts.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    pub(crate) fn function_error(&self, function: &str, message: impl Into<String>) -> ExprError {
        ExprError::Function {
            expr: self.source.to_string(),
            function: function.to_string(),
            message: message.into(),
        }
    }

    fn syntax(&self, at: &SpannedExpr<'_>, message: &str) -> ExprError {
        ExprError::Syntax {
            expr: self.source.to_string(),
            message: message.to_string(),
            offset: at.origin.span.start,
        }
    }
}

/// A comparison operator applied with GitHub's loose rules (see [`loose_cmp`]).
fn compare(op: &BinOp, a: Operand<'_>, b: Operand<'_>) -> bool {
    let ord = loose_cmp(a, b);
    match op {
        BinOp::Eq => ord == Some(Ordering::Equal),
        BinOp::Neq => ord != Some(Ordering::Equal),
        BinOp::Lt => ord == Some(Ordering::Less),
        BinOp::Le => matches!(ord, Some(Ordering::Less | Ordering::Equal)),
        BinOp::Gt => ord == Some(Ordering::Greater),
        BinOp::Ge => matches!(ord, Some(Ordering::Greater | Ordering::Equal)),
        BinOp::And | BinOp::Or => unreachable!("logical operators are not comparisons"),
    }
}

fn literal(l: &Literal<'_>) -> Value {
    match l {
        Literal::Number(n) => Value::Number(*n),
        Literal::String(s) => Value::String(s.to_string()),
        Literal::Boolean(b) => Value::Bool(*b),
        Literal::Null => Value::Null,
    }
}

fn boolean<'a>(b: bool) -> Val<'a> {
    Val::Owned(Value::Bool(b))
}
