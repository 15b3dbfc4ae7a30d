//! Importing a base from a tarball: a plain rootfs tar (optionally gzip-compressed), or a
//! single-layer image archive (`docker save` or an OCI archive), extracted so that no entry
//! can write outside the new root.
//!
//! The tarball may be hostile. Entry names must be relative and free of `..`; nothing is
//! ever written through a symlink (a path whose parent is a symlink is refused, and an
//! existing symlink is replaced rather than followed); hard links must name an entry inside
//! the root; relative symlink targets must not climb above the root. Absolute symlink
//! targets are fine: a rootfs is full of them, and nothing follows them here; inside the
//! sandbox they resolve within the base. Device nodes, FIFOs and whiteouts are skipped: the
//! sandbox brings its own `/dev`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tar::EntryType;

use super::{BaseError, Progress, Step};

/// What kind of tarball a base was imported from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportFormat {
    /// A tar of a root filesystem.
    RootfsTar,
    /// `docker save` output: `manifest.json` naming the layers.
    DockerArchive,
    /// An OCI image layout in a tar: `oci-layout`, `index.json`, `blobs/`.
    OciArchive,
}

/// The result of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub format: ImportFormat,
    /// sha256 of the file as given.
    pub sha256: String,
    pub extracted: Extracted,
}

/// What an extraction wrote and skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extracted {
    pub entries: u64,
    /// Device nodes and FIFOs.
    pub skipped_devices: u64,
    pub skipped_whiteouts: u64,
}

/// Largest metadata file (manifest, index) read into memory from an image archive.
const MAX_METADATA: u64 = 4 << 20;

/// Imports `tarball` into the empty directory `root`.
pub fn import(
    tarball: &Path,
    root: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Imported, BaseError> {
    let sha256 = sha256_file(tarball)?;
    let (format, layer) = detect(tarball)?;
    let extracted = match &layer {
        None => extract(open_decompressed(tarball)?, tarball, root, progress)?,
        Some(member) => {
            let mut found = None;
            for_member(tarball, member, |reader| {
                found = Some(extract(
                    decompressed(Box::new(reader), tarball)?,
                    tarball,
                    root,
                    progress,
                )?);
                Ok(())
            })?;
            found.ok_or_else(|| BaseError::Format {
                path: tarball.to_path_buf(),
                why: format!("the layer {member} named by the image is missing"),
            })?
        }
    };
    tracing::debug!(
        file = %tarball.display(),
        ?format,
        entries = extracted.entries,
        skipped_devices = extracted.skipped_devices,
        skipped_whiteouts = extracted.skipped_whiteouts,
        "imported"
    );
    Ok(Imported {
        format,
        sha256,
        extracted,
    })
}

fn sha256_file(path: &Path) -> Result<String, BaseError> {
    let mut file = File::open(path).map_err(|source| BaseError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|source| BaseError::ReadTar {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn open_decompressed(path: &Path) -> Result<Box<dyn Read>, BaseError> {
    let file = File::open(path).map_err(|source| BaseError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    decompressed(Box::new(file), path)
}

/// Wraps `reader` in a gzip decoder when it starts with the gzip magic.
fn decompressed<'a>(
    reader: Box<dyn Read + 'a>,
    path: &Path,
) -> Result<Box<dyn Read + 'a>, BaseError> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let head = reader.fill_buf().map_err(|source| BaseError::ReadTar {
        path: path.to_path_buf(),
        source,
    })?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(BaseError::Format {
            path: path.to_path_buf(),
            why: "zstd-compressed tarballs are not supported; decompress it first".into(),
        })
    } else {
        Ok(Box::new(reader))
    }
}

/// Tells a rootfs tar from an image archive by its top-level metadata files, and for an
/// image finds its one layer.
fn detect(tarball: &Path) -> Result<(ImportFormat, Option<String>), BaseError> {
    let wanted = ["manifest.json", "index.json", "oci-layout"];
    let mut metadata: HashMap<String, Vec<u8>> = HashMap::new();
    let mut names = std::collections::HashSet::new();
    let read_err = |source| BaseError::ReadTar {
        path: tarball.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(open_decompressed(tarball)?);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let name = member_name(&entry.path_bytes());
        if wanted.contains(&name.as_str()) && entry.size() <= MAX_METADATA {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(read_err)?;
            metadata.insert(name.clone(), bytes);
        }
        names.insert(name);
    }
    let bad = |why: String| BaseError::Format {
        path: tarball.to_path_buf(),
        why,
    };

    if let Some(bytes) = metadata.get("manifest.json") {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct DockerImage {
            layers: Vec<String>,
        }
        if let Ok(images) = serde_json::from_slice::<Vec<DockerImage>>(bytes) {
            let layers: Vec<&String> = images.iter().flat_map(|i| &i.layers).collect();
            if !layers.is_empty() && layers.iter().all(|l| names.contains(l.as_str())) {
                return match (images.len(), layers.as_slice()) {
                    (1, [layer]) => Ok((ImportFormat::DockerArchive, Some((*layer).clone()))),
                    (1, _) => Err(bad(format!(
                        "the image has {} layers; only single-layer images can be imported (flatten it first)",
                        layers.len()
                    ))),
                    (n, _) => Err(bad(format!(
                        "the archive holds {n} images; only one can be imported"
                    ))),
                };
            }
        }
    }

    if let (Some(index), true) = (
        metadata.get("index.json"),
        metadata.contains_key("oci-layout"),
    ) {
        let manifest = oci_manifest(tarball, index, 0)?;
        return match manifest.layers.as_slice() {
            [layer] => Ok((
                ImportFormat::OciArchive,
                Some(blob_member(&layer.digest, tarball)?),
            )),
            layers => Err(bad(format!(
                "the image has {} layers; only single-layer images can be imported (flatten it first)",
                layers.len()
            ))),
        };
    }
    Ok((ImportFormat::RootfsTar, None))
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(rename = "mediaType", default)]
    media_type: String,
}

#[derive(Deserialize)]
struct OciIndexOrManifest {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Follows an OCI index down to its single image manifest.
fn oci_manifest(tarball: &Path, bytes: &[u8], depth: u32) -> Result<OciIndexOrManifest, BaseError> {
    let bad = |why: String| BaseError::Format {
        path: tarball.to_path_buf(),
        why,
    };
    let doc: OciIndexOrManifest = serde_json::from_slice(bytes)
        .map_err(|err| bad(format!("unreadable OCI index or manifest: {err}")))?;
    if doc.manifests.is_empty() {
        return Ok(doc);
    }
    if depth > 2 {
        return Err(bad("OCI indexes nest too deeply".into()));
    }
    let [only] = doc.manifests.as_slice() else {
        return Err(bad(format!(
            "the OCI index lists {} manifests; only one image can be imported",
            doc.manifests.len()
        )));
    };
    tracing::debug!(media_type = %only.media_type, digest = %only.digest, "following the OCI index");
    let member = blob_member(&only.digest, tarball)?;
    let mut bytes = Vec::new();
    for_member(tarball, &member, |reader| {
        reader
            .take(MAX_METADATA)
            .read_to_end(&mut bytes)
            .map(drop)
            .map_err(|source| BaseError::ReadTar {
                path: tarball.to_path_buf(),
                source,
            })
    })?;
    oci_manifest(tarball, &bytes, depth + 1)
}

fn blob_member(digest: &str, tarball: &Path) -> Result<String, BaseError> {
    match digest.split_once(':') {
        Some((algorithm, hex))
            if !algorithm.is_empty()
                && !hex.is_empty()
                && algorithm.chars().all(|c| c.is_ascii_alphanumeric())
                && hex.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            Ok(format!("blobs/{algorithm}/{hex}"))
        }
        _ => Err(BaseError::Format {
            path: tarball.to_path_buf(),
            why: format!("{digest:?} is not a digest"),
        }),
    }
}

/// Calls `f` with the content of the archive member `member` (only the first match).
fn for_member(
    tarball: &Path,
    member: &str,
    f: impl FnOnce(&mut dyn Read) -> Result<(), BaseError>,
) -> Result<(), BaseError> {
    let read_err = |source| BaseError::ReadTar {
        path: tarball.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(open_decompressed(tarball)?);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        if member_name(&entry.path_bytes()) == member {
            return f(&mut entry);
        }
    }
    Err(BaseError::Format {
        path: tarball.to_path_buf(),
        why: format!("{member} is not in the archive"),
    })
}

/// An archive member's name without `./` prefixes or trailing slashes, for matching.
fn member_name(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let parts: Vec<&str> = text
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    parts.join("/")
}

/// A checked entry name: relative, no `..`, no NUL, as path components.
fn safe_relative(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    if raw.contains(&0) {
        return Err("the name contains a NUL byte".into());
    }
    // umoci and others name the root directory itself "/": that one is the root, not an
    // absolute path.
    if raw.starts_with(b"/") && !raw.iter().all(|b| *b == b'/') {
        return Err("absolute paths are not allowed".into());
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("`..` is not allowed in names".into()),
            part => parts.push(part),
        }
    }
    Ok(parts)
}

/// Whether a symlink at `depth` directories below the root, pointing at the relative
/// `target`, stays within the root when resolved lexically.
fn relative_link_stays_inside(depth: usize, target: &[u8]) -> bool {
    let mut level = depth as isize;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                level -= 1;
                if level < 0 {
                    return false;
                }
            }
            _ => level += 1,
        }
    }
    true
}

fn join(root: &Path, parts: &[&[u8]]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut path = root.to_path_buf();
    for part in parts {
        path.push(std::ffi::OsStr::from_bytes(part));
    }
    path
}

/// Extracts `reader`, a tar stream, into `root`, refusing hostile entries.
pub fn extract(
    reader: Box<dyn Read + '_>,
    tarball: &Path,
    root: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Extracted, BaseError> {
    let read_err = |source| BaseError::ReadTar {
        path: tarball.to_path_buf(),
        source,
    };
    // Ownership is kept only when we may give it away (root); otherwise files are ours.
    let as_root = fs::metadata(root)
        .map_err(|source| BaseError::Extract {
            path: root.to_path_buf(),
            source,
        })?
        .uid()
        == 0;
    let mut done = Extracted::default();
    let mut dir_times = Vec::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let hostile = |why: String| BaseError::Hostile {
            entry: shown.clone(),
            why,
        };
        let parts = safe_relative(&raw).map_err(hostile)?;
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        let Some((last, parents)) = parts.split_last() else {
            // `./` itself: the root's own mode and owner.
            if kind.is_dir() {
                apply_metadata(&entry, root, as_root, false)?;
                dir_times.push((root.to_path_buf(), mtime_of(&entry)));
            }
            continue;
        };
        if last.starts_with(b".wh.") {
            done.skipped_whiteouts += 1;
            continue;
        }
        if matches!(kind, EntryType::Char | EntryType::Block | EntryType::Fifo) {
            done.skipped_devices += 1;
            continue;
        }
        ensure_real_dirs(root, parents, &shown)?;
        let path = join(root, &parts);
        let existing = fs::symlink_metadata(&path).ok();
        let write_err = |source| BaseError::Extract {
            path: path.clone(),
            source,
        };
        if let Some(existing) = &existing {
            match (existing.is_dir(), kind.is_dir()) {
                (true, true) => {}
                (true, false) => fs::remove_dir(&path).map_err(|err| {
                    if err.kind() == io::ErrorKind::DirectoryNotEmpty {
                        hostile("it would replace a directory that is not empty".into())
                    } else {
                        write_err(err)
                    }
                })?,
                // A file or symlink is replaced, never written through.
                (false, _) => fs::remove_file(&path).map_err(write_err)?,
            }
        }
        match kind {
            EntryType::Directory => {
                if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                    fs::create_dir(&path).map_err(write_err)?;
                }
                apply_metadata(&entry, &path, as_root, false)?;
                dir_times.push((path.clone(), mtime_of(&entry)));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut file = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(write_err)?;
                io::copy(&mut entry, &mut file).map_err(|source| BaseError::ReadTar {
                    path: tarball.to_path_buf(),
                    source,
                })?;
                drop(file);
                apply_metadata(&entry, &path, as_root, false)?;
                set_times(&path, mtime_of(&entry), false)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.is_empty() || target.contains(&0) {
                    return Err(hostile("a symlink needs a target without NUL bytes".into()));
                }
                if !target.starts_with(b"/") && !relative_link_stays_inside(parents.len(), &target)
                {
                    return Err(hostile(format!(
                        "the symlink target {:?} climbs out of the root",
                        String::from_utf8_lossy(&target)
                    )));
                }
                use std::os::unix::ffi::OsStrExt;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                    .map_err(write_err)?;
                apply_metadata(&entry, &path, as_root, true)?;
                set_times(&path, mtime_of(&entry), true)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target_parts = safe_relative(&target)
                    .map_err(|why| hostile(format!("hard link target: {why}")))?;
                let Some((_, target_parents)) = target_parts.split_last() else {
                    return Err(hostile("a hard link needs a target".into()));
                };
                ensure_existing_real_dirs(root, target_parents, &shown)?;
                let source = join(root, &target_parts);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(_) => {
                        return Err(hostile(format!(
                            "hard link to {:?}, which is not a regular file",
                            String::from_utf8_lossy(&target)
                        )));
                    }
                    Err(_) => {
                        return Err(hostile(format!(
                            "hard link to {:?}, which is not in the archive before it",
                            String::from_utf8_lossy(&target)
                        )));
                    }
                }
                fs::hard_link(&source, &path).map_err(write_err)?;
            }
            other => {
                tracing::debug!(entry = %shown, kind = ?other, "skipping an entry of an unsupported type");
                continue;
            }
        }
        done.entries += 1;
        if done.entries.is_multiple_of(256) {
            progress(Progress::Item {
                step: Step::Import,
                name: &shown,
                done: done.entries,
                total: None,
            });
        }
    }
    progress(Progress::Item {
        step: Step::Import,
        name: "",
        done: done.entries,
        total: Some(done.entries),
    });
    // Last, since creating entries inside a directory changes its mtime.
    for (dir, mtime) in dir_times {
        set_times(&dir, mtime, false)?;
    }
    Ok(done)
}

/// Creates the missing parents of an entry as real directories; refuses if any existing
/// parent is a symlink or not a directory, since writing there would leave the root.
fn ensure_real_dirs(root: &Path, parents: &[&[u8]], entry: &str) -> Result<(), BaseError> {
    let mut path = root.to_path_buf();
    for (i, part) in parents.iter().enumerate() {
        path = join(&path, &[part]);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) => return Err(not_a_dir(entry, &parents[..=i], meta.is_symlink())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // A directory the tarball implies but does not list: 0755, never the
                // importer's umask (it lands in the base layer).
                fs::create_dir(&path)
                    .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)))
                    .map_err(|source| BaseError::Extract {
                        path: path.clone(),
                        source,
                    })?;
            }
            Err(source) => return Err(BaseError::Extract { path, source }),
        }
    }
    Ok(())
}

/// Like [`ensure_real_dirs`] for a hard link's target: its parents must already exist.
fn ensure_existing_real_dirs(root: &Path, parents: &[&[u8]], entry: &str) -> Result<(), BaseError> {
    let mut path = root.to_path_buf();
    for (i, part) in parents.iter().enumerate() {
        path = join(&path, &[part]);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) => return Err(not_a_dir(entry, &parents[..=i], meta.is_symlink())),
            Err(_) => {
                return Err(BaseError::Hostile {
                    entry: entry.to_string(),
                    why: "hard link into a directory that is not in the archive before it".into(),
                });
            }
        }
    }
    Ok(())
}

fn not_a_dir(entry: &str, prefix: &[&[u8]], symlink: bool) -> BaseError {
    let prefix: Vec<String> = prefix
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let what = if symlink {
        "a symlink; nothing is written through symlinks"
    } else {
        "not a directory"
    };
    BaseError::Hostile {
        entry: entry.to_string(),
        why: format!("it goes through {:?}, which is {what}", prefix.join("/")),
    }
}

fn mtime_of<R: Read>(entry: &tar::Entry<'_, R>) -> i64 {
    entry
        .header()
        .mtime()
        .ok()
        .and_then(|t| i64::try_from(t).ok())
        .unwrap_or(0)
}

fn apply_metadata<R: Read>(
    entry: &tar::Entry<'_, R>,
    path: &Path,
    as_root: bool,
    symlink: bool,
) -> Result<(), BaseError> {
    let header = entry.header();
    let err = |source| BaseError::Extract {
        path: path.to_path_buf(),
        source,
    };
    if as_root {
        let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
        let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
        // Before the mode: chown clears set-uid and set-gid bits.
        std::os::unix::fs::lchown(path, uid, gid).map_err(err)?;
    }
    if !symlink {
        let mode = header.mode().map_err(err)? & 0o7777;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

fn set_times(path: &Path, mtime: i64, symlink: bool) -> Result<(), BaseError> {
    let time = filetime::FileTime::from_unix_time(mtime, 0);
    let result = if symlink {
        filetime::set_symlink_file_times(path, time, time)
    } else {
        filetime::set_file_times(path, time, time)
    };
    result.map_err(|source| BaseError::Extract {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_relative_without_dotdot() {
        assert_eq!(
            safe_relative(b"./usr/bin/python3").unwrap(),
            vec![&b"usr"[..], b"bin", b"python3"]
        );
        assert!(safe_relative(b"./").unwrap().is_empty());
        assert!(safe_relative(b"/").unwrap().is_empty());
        assert!(safe_relative(b"/etc/passwd").is_err());
        assert!(safe_relative(b"../x").is_err());
        assert!(safe_relative(b"a/../../x").is_err());
        assert!(safe_relative(b"a/b\0c").is_err());
    }

    #[test]
    fn relative_symlinks_may_not_climb_out() {
        // lib64/ld.so -> ../lib/x86_64-linux-gnu/ld.so, one level deep: fine.
        assert!(relative_link_stays_inside(
            1,
            b"../lib/x86_64-linux-gnu/ld.so"
        ));
        assert!(relative_link_stays_inside(0, b"usr/bin"));
        assert!(relative_link_stays_inside(2, b"../../etc"));
        assert!(!relative_link_stays_inside(0, b"../etc"));
        assert!(!relative_link_stays_inside(2, b"../../../etc"));
        assert!(relative_link_stays_inside(3, b"a/../../../../x"));
        assert!(!relative_link_stays_inside(3, b"a/../../../../../x"));
    }

    #[test]
    fn member_names_match_without_dot_prefixes() {
        assert_eq!(member_name(b"./blobs/sha256/ab"), "blobs/sha256/ab");
        assert_eq!(member_name(b"manifest.json"), "manifest.json");
        assert_eq!(
            blob_member("sha256:abcd", Path::new("x")).unwrap(),
            "blobs/sha256/abcd"
        );
        assert!(blob_member("sha256:../../etc", Path::new("x")).is_err());
    }
}
