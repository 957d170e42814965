//! Pure core (placeholder while the skeleton is laid down).
