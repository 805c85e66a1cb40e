//! The VMDK text descriptor: `key=value` lines, extent lines and the disk
//! database (`ddb.*`), embedded in sparse files or standing alone for flat
//! images.

use crate::error::{Error, Result};

/// `parentCID` of an image without a parent.
pub(crate) const NO_PARENT_CID: u32 = 0xffff_ffff;

/// One extent line: `RW 2048 SPARSE "disk.vmdk"` or `RW 2048 FLAT "x-flat.vmdk" 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtentLine {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub(crate) access: String,
    /// Size in sectors.
    pub(crate) sectors: u64,
    /// `SPARSE`, `FLAT`, `ZERO`, `VMFS`, ...
    pub(crate) kind: String,
    /// The extent's file name (relative to the descriptor), if any.
    pub(crate) file: Option<String>,
    /// Offset in sectors into the extent file (flat extents).
    pub(crate) offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub(crate) cid: Option<u32>,
    pub(crate) parent_cid: Option<u32>,
    pub(crate) create_type: Option<String>,
    pub(crate) extents: Vec<ExtentLine>,
    /// Every other `key = value` line (including `ddb.*`), unquoted.
    pub(crate) keys: Vec<(String, String)>,
}

impl Descriptor {
    /// Parse descriptor text. `bytes` may be NUL-padded (embedded descriptors).
    /// Errors carry no file context; the caller adds it.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = String::from_utf8_lossy(&bytes[..end]);
        let mut d = Descriptor {
            cid: None,
            parent_cid: None,
            create_type: None,
            extents: Vec::new(),
            keys: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                d.extents.push(parse_extent(line).ok_or_else(|| {
                    Error::corrupt(format!(
                        "descriptor line {}: bad extent line {line:?}",
                        n + 1
                    ))
                })?);
                continue;
            }
            // Lines that are neither key=value nor extents carry nothing
            // this library needs; tools differ, so they are skipped.
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            let value = unquote(value.trim());
            match key {
                "CID" => d.cid = Some(parse_cid(value, n)?),
                "parentCID" => d.parent_cid = Some(parse_cid(value, n)?),
                "createType" => d.create_type = Some(value.to_string()),
                _ => d.keys.push((key.to_string(), value.to_string())),
            }
        }
        Ok(d)
    }

    /// The value of `key` among the other keys.
    #[allow(dead_code)]
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the descriptor names a parent (a snapshot delta disk).
    pub(crate) fn has_parent(&self) -> bool {
        self.parent_cid.is_some_and(|p| p != NO_PARENT_CID)
            || self.keys.iter().any(|(k, _)| k == "parentFileNameHint")
    }
}

fn parse_cid(value: &str, n: usize) -> Result<u32> {
    u32::from_str_radix(value, 16)
        .map_err(|_| Error::corrupt(format!("descriptor line {}: bad CID {value:?}", n + 1)))
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

fn parse_extent(line: &str) -> Option<ExtentLine> {
    let mut rest = line;
    let mut token = || {
        let t = rest.trim_start();
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        let (tok, tail) = t.split_at(end);
        rest = tail;
        tok.to_string()
    };
    let access = token();
    let sectors = token().parse().ok()?;
    let kind = token();
    if kind.is_empty() {
        return None;
    }
    let tail = rest.trim();
    if tail.is_empty() {
        return Some(ExtentLine {
            access,
            sectors,
            kind,
            file: None,
            offset: 0,
        });
    }
    let quoted = tail.strip_prefix('"')?;
    let close = quoted.find('"')?;
    let file = quoted[..close].to_string();
    let after = quoted[close + 1..].trim();
    let offset = if after.is_empty() {
        0
    } else {
        after.parse().ok()?
    };
    Some(ExtentLine {
        access,
        sectors,
        kind,
        file: Some(file),
        offset,
    })
}

/// Check a file name can be written into a descriptor.
pub(crate) fn check_file_name(name: &str) -> Result<()> {
    if name.contains(['"', '\n', '\r', '\0']) {
        return Err(Error::invalid(format!(
            "file name {name:?} cannot be written into a VMDK descriptor"
        )));
    }
    Ok(())
}

/// Descriptor text for a new image with one extent line.
pub(crate) fn render(create_type: &str, capacity: u64, extent: &str, cid: u32) -> String {
    // IDE geometry as VMware writes it: 16 heads, 63 sectors, at most 16383 cylinders.
    let cylinders = (capacity / (16 * 63)).clamp(1, 16383);
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID={NO_PARENT_CID:08x}\n\
         createType=\"{create_type}\"\n\
         \n\
         # Extent description\n\
         RW {capacity} {extent}\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"ide\"\n"
    )
}

/// A random CID (content ID) for a new image.
pub(crate) fn random_cid() -> Result<u32> {
    let cid = u32::from_le_bytes(crate::fileio::random_bytes::<4>()?);
    // 0xffffffff means "no parent"; never use it as a content ID.
    Ok(if cid == NO_PARENT_CID { 1 } else { cid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_and_vmware_descriptors() {
        let text = b"# Disk DescriptorFile\nversion=1\nCID=1a2b3c4d\nparentCID=ffffffff\n\
createType=\"monolithicFlat\"\n\n# Extent description\nRW 204800 FLAT \"my disk-flat.vmdk\" 0\n\
RDONLY 10 ZERO\n\n#DDB\nddb.adapterType = \"lsilogic\"\n\0\0\0";
        let d = Descriptor::parse(text).unwrap();
        assert_eq!(d.cid, Some(0x1a2b_3c4d));
        assert!(!d.has_parent());
        assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(
            d.extents[0],
            ExtentLine {
                access: "RW".into(),
                sectors: 204800,
                kind: "FLAT".into(),
                file: Some("my disk-flat.vmdk".into()),
                offset: 0
            }
        );
        assert_eq!(d.extents[1].kind, "ZERO");
        assert_eq!(d.get("ddb.adapterType"), Some("lsilogic"));
    }

    #[test]
    fn rendered_descriptor_parses_back() {
        let text = render("monolithicSparse", 4096, "SPARSE \"a.vmdk\"", 0x1234);
        let d = Descriptor::parse(text.as_bytes()).unwrap();
        assert_eq!(d.cid, Some(0x1234));
        assert_eq!(d.parent_cid, Some(NO_PARENT_CID));
        assert_eq!(d.extents[0].sectors, 4096);
        assert_eq!(d.extents[0].file.as_deref(), Some("a.vmdk"));
    }

    #[test]
    fn garbage_is_corrupt_not_panic() {
        for t in [&b"RW x FLAT"[..], b"CID=zz", b"RW 1 FLAT \"unterminated"] {
            assert_eq!(
                Descriptor::parse(t).unwrap_err().kind(),
                crate::ErrorKind::Corrupt
            );
        }
        // Unknown non-key lines are skipped.
        assert!(Descriptor::parse(b"hello\ncreateType=\"x\"")
            .unwrap()
            .create_type
            .is_some());
    }
}
