//! ferry-filter: the write interceptor (being written).

pub mod nbd;
