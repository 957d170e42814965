//! Hypervisor drivers (placeholder while the skeleton is laid down).
