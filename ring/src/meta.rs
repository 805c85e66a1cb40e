//! Per-disk persistent tracking metadata (being written).
