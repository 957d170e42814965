//! A worker's reconcile decision (being written).
