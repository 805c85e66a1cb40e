//! Crash-test writer: creates an image, then writes numbered, non-overlapping
//! 64 KiB records (see `ferry_tests::crash_writer`), flushing after each and
//! printing its number once the flush returned. The rig test kills it with
//! SIGKILL at a random point and checks that every printed record reads back.
//!
//! Usage: image-writer FORMAT PATH [PARENT]

use std::io::Write;
use std::path::PathBuf;

use ferry_tests::crash_writer::{data, offset, RECORDS, SIZE};
use ferry_vhd::{create, CreateOptions, Format};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let format = Format::from_name(&args[1]).expect("format");
    let path = PathBuf::from(&args[2]);
    let options = CreateOptions {
        parent: args.get(3).map(PathBuf::from),
        ..CreateOptions::default()
    };
    let size = if format == Format::VhdDiff { 0 } else { SIZE };
    let mut image = create(&path, format, size, &options).expect("create image");
    let mut stdout = std::io::stdout();
    for i in 0..RECORDS {
        image.write_at(&data(i), offset(i)).expect("write");
        image.flush().expect("flush");
        writeln!(stdout, "{i}")
            .and_then(|()| stdout.flush())
            .expect("stdout");
    }
    image.finish().expect("finish");
    writeln!(stdout, "done").expect("stdout");
}
