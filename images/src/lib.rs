//! Image building (placeholder while the skeleton is laid down).
