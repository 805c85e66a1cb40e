//! The filter's contacts with the Linux kernel on a real host: attaching a
//! protected disk to a kernel NBD device over generic netlink
//! ([`nbd_netlink`]) and sliding that device under a live device-mapper
//! volume ([`dm`]). Each module holds its FFI and byte layouts, with the
//! kernel header each constant comes from.

pub mod attach;
pub mod dm;
pub mod nbd_netlink;
mod netlink;
pub mod volume;
