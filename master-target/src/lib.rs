//! ferry-master-target (being written).
