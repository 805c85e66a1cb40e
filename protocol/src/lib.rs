//! ferry-protocol (being written).
