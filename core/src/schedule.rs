//! Placing spec instances on workers (being written).
