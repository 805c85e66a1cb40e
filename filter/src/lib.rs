//! ferry-filter: the write interceptor (being written).

pub mod nbd;
pub mod order;
pub mod tracker;
pub mod uring;
