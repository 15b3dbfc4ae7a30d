//! The tar encoding of one layer entry: a ustar header, preceded by a PAX extended header
//! when the entry does not fit ustar (long or non-UTF-8 names, large ids or sizes, xattrs).
//! Written by hand so every byte is ours to pin: no user/group names, no atime/ctime,
//! fixed PAX header names, no sparse maps, no record padding beyond the two end blocks.

/// Size of one tar block.
pub const BLOCK: usize = 512;

/// The two zero blocks that end an archive.
pub const END: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

/// The tar type flag of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeFlag {
    Regular,
    HardLink,
    Symlink,
    Char,
    Block,
    Directory,
    Fifo,
}

impl TypeFlag {
    fn byte(self) -> u8 {
        match self {
            TypeFlag::Regular => b'0',
            TypeFlag::HardLink => b'1',
            TypeFlag::Symlink => b'2',
            TypeFlag::Char => b'3',
            TypeFlag::Block => b'4',
            TypeFlag::Directory => b'5',
            TypeFlag::Fifo => b'6',
        }
    }
}

/// Everything the archive records about one entry.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    /// Path inside the layer, relative, directories ending in `/`.
    pub path: &'a [u8],
    pub kind: TypeFlag,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: u64,
    /// Symlink target or hard-link target path.
    pub link: &'a [u8],
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes to record, sorted by name.
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

const NAME_LEN: usize = 100;
const PREFIX_LEN: usize = 155;
const MAX_OCTAL_7: u64 = 0o7777777;
const MAX_OCTAL_11: u64 = 0o77777777777;
/// A fixed name for every PAX header block (GNU tar puts a pid in it, which is not
/// reproducible); readers ignore it.
const PAX_NAME: &[u8] = b"././@PaxHeader";

/// Appends the encoded header (PAX block and records if needed, then the ustar block) to
/// `out`. The entry's data, if any, follows it, padded with [`padding`].
pub fn encode(h: &Header<'_>, out: &mut Vec<u8>) {
    let utf8 = std::str::from_utf8(h.path).is_ok() && std::str::from_utf8(h.link).is_ok();
    let split = split_ustar(h.path);
    let mut records = Vec::new();
    if split.is_none() || !utf8 {
        record(&mut records, b"path", h.path);
    }
    if h.link.len() > NAME_LEN || (!utf8 && !h.link.is_empty()) {
        record(&mut records, b"linkpath", h.link);
    }
    if h.size > MAX_OCTAL_11 {
        record(&mut records, b"size", h.size.to_string().as_bytes());
    }
    if h.uid > MAX_OCTAL_7 {
        record(&mut records, b"uid", h.uid.to_string().as_bytes());
    }
    if h.gid > MAX_OCTAL_7 {
        record(&mut records, b"gid", h.gid.to_string().as_bytes());
    }
    for (name, value) in h.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        record(&mut records, &key, value);
    }
    if !records.is_empty() {
        let pax = ustar_block(
            (&[], PAX_NAME),
            b'x',
            0o644,
            0,
            0,
            records.len() as u64,
            0,
            &[],
            0,
            0,
        );
        out.extend_from_slice(&pax);
        out.extend_from_slice(&records);
        out.resize(out.len() + padding(records.len() as u64), 0);
    }
    let (prefix, name) = split.unwrap_or((&[], truncate(h.path, NAME_LEN)));
    let block = ustar_block(
        (prefix, name),
        h.kind.byte(),
        h.mode,
        clamp(h.uid, MAX_OCTAL_7),
        clamp(h.gid, MAX_OCTAL_7),
        clamp(h.size, MAX_OCTAL_11),
        h.mtime.min(MAX_OCTAL_11),
        truncate(h.link, NAME_LEN),
        h.dev_major,
        h.dev_minor,
    );
    out.extend_from_slice(&block);
}

/// Zero bytes needed after `size` bytes of data to reach a block boundary.
pub fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// A value too big for its octal field is written as 0 there; the PAX record carries it.
fn clamp(value: u64, max: u64) -> u64 {
    if value > max { 0 } else { value }
}

fn truncate(bytes: &[u8], len: usize) -> &[u8] {
    &bytes[..bytes.len().min(len)]
}

/// Splits a path into ustar's prefix and name fields, if it fits them.
fn split_ustar(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.len() <= NAME_LEN {
        return Some((&[], path));
    }
    // A trailing slash (directories) must stay in the name part.
    let search = &path[..path.len() - 1];
    search
        .iter()
        .enumerate()
        .rev()
        .filter(|&(i, &b)| b == b'/' && i <= PREFIX_LEN && path.len() - i - 1 <= NAME_LEN)
        .map(|(i, _)| (&path[..i], &path[i + 1..]))
        .next()
        .filter(|(prefix, _)| !prefix.is_empty())
}

/// Appends one PAX record, `"<len> <key>=<value>\n"`, whose length counts its own digits.
fn record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let base = key.len() + value.len() + 3;
    let mut len = base + digits(base);
    if digits(len) != digits(base) {
        len = base + digits(len);
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn digits(n: usize) -> usize {
    n.to_string().len()
}

#[allow(clippy::too_many_arguments)]
fn ustar_block(
    (prefix, name): (&[u8], &[u8]),
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    link: &[u8],
    dev_major: u32,
    dev_minor: u32,
) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], u64::from(mode));
    octal(&mut b[108..116], uid);
    octal(&mut b[116..124], gid);
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], mtime);
    b[156] = typeflag;
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    // uname (265..297) and gname (297..329) stay empty: ids alone are reproducible.
    octal(&mut b[329..337], u64::from(dev_major));
    octal(&mut b[337..345], u64::from(dev_minor));
    b[345..345 + prefix.len()].copy_from_slice(prefix);
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    octal(&mut b[148..155], u64::from(sum));
    b[154] = 0;
    b[155] = b' ';
    b
}

/// Writes `value` as zero-padded octal digits followed by a NUL, filling the field.
fn octal(field: &mut [u8], mut value: u64) {
    let n = field.len() - 1;
    for i in (0..n).rev() {
        field[i] = b'0' + (value & 7) as u8;
        value >>= 3;
    }
    field[n] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut out = Vec::new();
        record(&mut out, b"path", &[b'a'; 93]);
        assert_eq!(out.len(), 103);
        assert!(out.starts_with(b"103 path="));
        let mut out = Vec::new();
        record(&mut out, b"path", b"x");
        assert_eq!(out, b"9 path=x\n");
    }

    #[test]
    fn long_paths_split_or_go_to_pax() {
        let long = [b"d/".repeat(60), b"file".to_vec()].concat();
        let (prefix, name) = split_ustar(&long).unwrap();
        assert!(prefix.len() <= PREFIX_LEN && name.len() <= NAME_LEN);
        assert_eq!([prefix, b"/", name].concat(), long);
        assert!(split_ustar(&[b'x'; 300]).is_none());
    }

    #[test]
    fn big_sizes_and_ids_go_to_pax() {
        let mut out = Vec::new();
        let h = Header {
            path: b"big",
            kind: TypeFlag::Regular,
            mode: 0o644,
            uid: 5_000_000,
            gid: 7,
            size: 9 << 30,
            mtime: 0,
            link: b"",
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        };
        encode(&h, &mut out);
        let text = String::from_utf8_lossy(&out[BLOCK..2 * BLOCK]);
        assert!(text.contains(&format!("size={}\n", 9u64 << 30)), "{text}");
        assert!(text.contains("uid=5000000\n"), "{text}");
        assert!(!text.contains("gid="), "{text}");
        assert_eq!(out.len(), 3 * BLOCK);
    }

    #[test]
    fn checksum_matches_ustar_rule() {
        let mut out = Vec::new();
        let h = Header {
            path: b"a",
            kind: TypeFlag::Regular,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 3,
            mtime: 0,
            link: b"",
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        };
        encode(&h, &mut out);
        assert_eq!(out.len(), BLOCK);
        let mut copy = out.clone();
        copy[148..156].fill(b' ');
        let sum: u32 = copy.iter().map(|&x| u32::from(x)).sum();
        let field = std::str::from_utf8(&out[148..154]).unwrap();
        assert_eq!(u32::from_str_radix(field, 8).unwrap(), sum);
    }
}
