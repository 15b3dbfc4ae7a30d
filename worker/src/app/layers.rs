//! An image from the store, made runnable: its manifest and config read (verified by
//! digest), and each layer unpacked once into the content-addressed layer cache
//! `<data_dir>/layers/sha256/<hex>`, shared by every app on the worker.
//!
//! A layer is fetched (the store verifies the blob's digest), unpacked hostile-input safe
//! into a fresh temporary directory beside the cache, and renamed into place in one step:
//! a reader sees a whole layer or none, and two runs that unpack the same layer at once
//! both succeed (the second rename finds the first one's directory and drops its own).

use std::path::{Path, PathBuf};

use corral_protocol::Digest;
use serde::Deserialize;

use super::AppError;
use crate::source::ExtractLimits;
use crate::store::Store;

/// What the image's config says about running it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

/// A resolved image: its manifest digest, run config and layers (bottom first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub manifest_digest: Digest,
    pub config: ImageConfig,
    pub layers: Vec<Digest>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: RunConfig,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

fn digest(text: &str, what: &str) -> Result<Digest, AppError> {
    text.parse().map_err(|_| AppError::Image {
        reason: format!("{what} has an invalid digest {text:?}"),
    })
}

/// Reads the manifest of `image` (a tag or `sha256:` digest) and its config from `store`.
pub async fn resolve(store: &Store, image: &str) -> Result<ResolvedImage, AppError> {
    let manifest = store
        .get_manifest(image)
        .await
        .map_err(|source| AppError::Store {
            what: format!("the manifest of {image}"),
            source,
        })?;
    let parsed: Manifest =
        serde_json::from_slice(&manifest.bytes).map_err(|err| AppError::Image {
            reason: format!("the manifest of {image} is not an OCI image manifest: {err}"),
        })?;
    let config_digest = digest(&parsed.config.digest, "the image config")?;
    let scratch = tempfile::tempdir().map_err(|source| AppError::Io {
        what: "a temporary directory".into(),
        path: std::env::temp_dir(),
        source,
    })?;
    let config_path = scratch.path().join("config.json");
    store
        .get_blob_to_file_max(&config_digest, &config_path, 4 << 20)
        .await
        .map_err(|source| AppError::Store {
            what: format!("the config of {image}"),
            source,
        })?;
    let bytes = std::fs::read(&config_path).map_err(|source| AppError::Io {
        what: "reading the image config".into(),
        path: config_path.clone(),
        source,
    })?;
    let config: ConfigFile = serde_json::from_slice(&bytes).map_err(|err| AppError::Image {
        reason: format!("the config of {image} is not an OCI image config: {err}"),
    })?;
    let layers = parsed
        .layers
        .iter()
        .map(|layer| digest(&layer.digest, "a layer"))
        .collect::<Result<Vec<_>, _>>()?;
    if layers.is_empty() {
        return Err(AppError::Image {
            reason: format!("{image} has no layers"),
        });
    }
    let run = config.config;
    Ok(ResolvedImage {
        manifest_digest: manifest.digest,
        config: ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|dir| !dir.is_empty()),
        },
        layers,
    })
}

/// The content-addressed cache of unpacked layers under `<data_dir>/layers`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    root: PathBuf,
    limits: ExtractLimits,
}

/// How [`LayerCache::ensure`] found a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// Already unpacked.
    Hit,
    /// Fetched and unpacked now.
    Unpacked,
}

impl LayerCache {
    pub fn open(data_dir: &Path) -> Result<Self, AppError> {
        let root = data_dir.join("layers");
        for dir in [root.join("sha256"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|source| AppError::Io {
                what: "creating the layer cache".into(),
                path: dir.clone(),
                source,
            })?;
        }
        Ok(LayerCache {
            root,
            limits: ExtractLimits {
                // A base layer is a whole distribution's userland.
                max_entries: 1_000_000,
                max_total_bytes: 16 << 30,
                ..ExtractLimits::default()
            },
        })
    }

    /// Where the unpacked layer `digest` lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// Unpacks `digest` from `store` unless it is cached; returns its directory.
    pub async fn ensure(
        &self,
        store: &Store,
        digest: &Digest,
    ) -> Result<(PathBuf, Cached), AppError> {
        let dest = self.path(digest);
        if dest.is_dir() {
            return Ok((dest, Cached::Hit));
        }
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", digest.hex()))
            .tempdir_in(self.root.join("tmp"))
            .map_err(|source| AppError::Io {
                what: "a directory to unpack a layer in".into(),
                path: self.root.join("tmp"),
                source,
            })?;
        let blob = work.path().join("blob");
        store
            .get_blob_to_file(digest, &blob)
            .await
            .map_err(|source| AppError::Store {
                what: format!("layer {digest}"),
                source,
            })?;
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree).map_err(|source| AppError::Io {
            what: "creating a layer directory".into(),
            path: tree.clone(),
            source,
        })?;
        let limits = self.limits;
        let (from, into) = (blob.clone(), tree.clone());
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::PermissionsExt;
            // The layer's root directory: readable by every app's user.
            std::fs::set_permissions(&into, std::fs::Permissions::from_mode(0o755)).map_err(
                |e| crate::source::SourceError::Write {
                    path: into.clone(),
                    source: e,
                },
            )?;
            crate::source::extract_layer(&from, &into, &limits)
        })
        .await
        .map_err(|err| AppError::Io {
            what: "the unpacking thread".into(),
            path: tree.clone(),
            source: std::io::Error::other(err),
        })?
        .map_err(|source| AppError::Layer {
            digest: digest.clone(),
            source: Box::new(source),
        })?;
        let _ = std::fs::remove_file(&blob);
        match std::fs::rename(&tree, &dest) {
            Ok(()) => Ok((dest, Cached::Unpacked)),
            // Another run put the same layer in place first: same digest, same tree.
            Err(_) if dest.is_dir() => Ok((dest, Cached::Hit)),
            Err(source) => Err(AppError::Io {
                what: "moving an unpacked layer into the cache".into(),
                path: dest,
                source,
            }),
        }
    }

    /// Every layer of `image`, unpacked; the overlay's lower dirs, top first.
    pub async fn lower_dirs(
        &self,
        store: &Store,
        image: &ResolvedImage,
    ) -> Result<(Vec<PathBuf>, usize), AppError> {
        let mut dirs = Vec::with_capacity(image.layers.len());
        let mut unpacked = 0;
        for digest in &image.layers {
            let (dir, how) = self.ensure(store, digest).await?;
            if how == Cached::Unpacked {
                unpacked += 1;
            }
            dirs.push(dir);
        }
        dirs.reverse();
        Ok((dirs, unpacked))
    }
}

/// The `web:` command of a Heroku-style `Procfile` in `workdir`, as `sh -c` argv: what an
/// image whose config has no command runs. Looked up in the lower dirs top first, each
/// opened beneath its layer without following any symlink (a layer's links point into the
/// app's root, never the host's); a whiteout or anything but a regular file hides it.
pub fn procfile_command(lower_dirs: &[PathBuf], workdir: &str) -> Option<Vec<String>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::io::Read;
    let relative = Path::new(workdir.trim_start_matches('/')).join("Procfile");
    for dir in lower_dirs {
        let root = rustix::fs::open(
            dir,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let fd = match rustix::fs::openat2(
            &root,
            &relative,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(_) => return None,
        };
        let file = std::fs::File::from(fd);
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(64 * 1024).read_to_string(&mut text).ok()?;
        return web_command(&text);
    }
    None
}

/// The `web:` line of a Procfile.
fn web_command(procfile: &str) -> Option<Vec<String>> {
    procfile.lines().find_map(|line| {
        let command = line.trim().strip_prefix("web:")?.trim();
        (!command.is_empty()).then(|| vec!["/bin/sh".into(), "-c".into(), command.to_owned()])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_web_line_of_a_procfile_is_the_command() {
        assert_eq!(
            web_command("worker: python w.py\nweb: gunicorn app:app --bind 127.0.0.1:$PORT\n"),
            Some(vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                "gunicorn app:app --bind 127.0.0.1:$PORT".to_owned()
            ])
        );
        assert_eq!(web_command("worker: x\n"), None);
        assert_eq!(web_command("web:   \n"), None);
    }

    #[test]
    fn a_procfile_is_found_top_first_and_never_through_a_link() {
        let top = tempfile::tempdir().unwrap();
        let low = tempfile::tempdir().unwrap();
        std::fs::create_dir(low.path().join("app")).unwrap();
        std::fs::write(low.path().join("app/Procfile"), "web: ./serve\n").unwrap();
        let dirs = vec![top.path().to_path_buf(), low.path().to_path_buf()];
        assert_eq!(
            procfile_command(&dirs, "/app").unwrap()[2],
            "./serve",
            "found in the lower layer"
        );
        // A link in a layer that points out of it is not followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("Procfile"), "web: evil\n").unwrap();
        std::os::unix::fs::symlink(outside.path(), top.path().join("app")).unwrap();
        assert_eq!(procfile_command(&dirs, "/app"), None);
    }
}
