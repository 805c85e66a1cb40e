//! The shared-memory write-order ring (being written).
