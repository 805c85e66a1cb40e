//! ferry-sidecar (being written).
