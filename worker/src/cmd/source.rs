//! `corral source push DIR|TARBALL`: make a source bundle available in a store and print
//! its digest. A tarball is checked with the same hostile-input safe extractor that the
//! worker uses (so a bundle that a job could never use is refused here, exit 65) and
//! uploaded byte for byte; a directory is packed deterministically first.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context;
use corral_protocol::Digest;
use tempfile::NamedTempFile;

use crate::cli::{SourceCommand, SourcePushArgs};
use crate::config::Sources;
use crate::exit;
use crate::source::{self, ExtractLimits};
use crate::store::{self, PutOutcome, Store};

pub fn run(command: SourceCommand) -> anyhow::Result<u8> {
    match command {
        SourceCommand::Push(args) => push(args),
    }
}

fn push(args: SourcePushArgs) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(push_async(args))
}

async fn push_async(args: SourcePushArgs) -> anyhow::Result<u8> {
    // The store and its credentials as the workers that will read the bundle have them.
    let sources = Sources::from_process(args.config.clone(), args.config_flags());
    let config = match super::check_config::load(&sources) {
        Ok(loaded) => loaded.config,
        Err(code) => return Ok(code),
    };
    let store = match crate::job::open_store(&config).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("corral: error: opening the store: {e}");
            return Ok(exit::USAGE);
        }
    };
    let meta = std::fs::metadata(&args.path)
        .with_context(|| format!("reading {}", args.path.display()))?;
    let (bundle, digest, size) = if meta.is_dir() {
        let (file, digest) = pack_dir(&args.path)?;
        let size = file.as_file().metadata()?.len();
        (file, digest, size)
    } else {
        let path = args.path.clone();
        let checked =
            tokio::task::spawn_blocking(move || source::validate(&path, &ExtractLimits::default()))
                .await?;
        if let Err(e) = checked {
            eprintln!(
                "corral: {}: not a usable source bundle: {e}",
                args.path.display()
            );
            return Ok(if e.is_job_fault() {
                exit::INVALID_INPUT
            } else {
                exit::PLATFORM_ERROR
            });
        }
        copy_to_spool(&args.path, store.spool_dir().as_deref())?
    };
    match store.put_blob_file(bundle.path(), &digest, size).await {
        Ok(outcome) => {
            let what = match outcome {
                PutOutcome::Uploaded => "uploaded",
                PutOutcome::AlreadyPresent => "already in the store",
                PutOutcome::Mounted => "mounted from another repository",
            };
            tracing::info!(%digest, size, "source bundle {what}");
            crate::outln!("{digest}")?;
            std::io::stdout().flush()?;
            Ok(exit::SUCCESS)
        }
        Err(e) => {
            eprintln!("corral: error: storing the bundle: {e}");
            Ok(exit::PLATFORM_ERROR)
        }
    }
}

/// Copies `path` into a temp file (in the store's spool dir when it has one, so the put is
/// a rename and the user's file stays where it is), hashing it on the way.
fn copy_to_spool(
    path: &Path,
    spool: Option<&Path>,
) -> anyhow::Result<(NamedTempFile, Digest, u64)> {
    let mut tmp = match spool {
        Some(dir) => NamedTempFile::new_in(dir),
        None => NamedTempFile::new(),
    }
    .context("creating a spool file")?;
    let mut src =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut src, tmp.as_file_mut())
        .with_context(|| format!("copying {}", path.display()))?;
    let (digest, size) = store::sha256_file(tmp.path())?;
    Ok((tmp, digest, size))
}

/// Packs `dir` deterministically into a tar.gz spooled to a temp file: the layer writer's
/// plain mode (entries sorted bytewise, mtimes clamped to 0, owners 0:0, permissions as git
/// keeps them: 0755 for directories and executables, 0644 for other files; device nodes
/// refused, no xattrs, pinned gzip). The same tree gives the same digest on any machine,
/// whoever owns the checkout and whatever umask it was made under.
pub fn pack_dir(dir: &Path) -> anyhow::Result<(NamedTempFile, Digest)> {
    use crate::layer::{
        DevicePolicy, IdMap, LayerOptions, Mode, PermissionPolicy, XattrPolicy, write_layer,
    };
    let spool = NamedTempFile::new().context("creating a temp file for the bundle")?;
    let options = LayerOptions {
        mode: Mode::Plain,
        epoch: 0,
        id_map: IdMap::squash(0, 0),
        devices: DevicePolicy::Refuse,
        xattrs: XattrPolicy::none(),
        permissions: PermissionPolicy::Normalized,
        threads: std::thread::available_parallelism().map_or(1, usize::from),
        ..LayerOptions::default()
    };
    let file = spool.reopen().context("reopening the bundle temp file")?;
    let summary = write_layer(dir, &options, std::io::BufWriter::new(file))
        .with_context(|| format!("packing {}", dir.display()))?;
    Ok((spool, summary.digest))
}

/// Packs `dir` with [`pack_dir`] and puts the bundle in `store`: its digest and size, the
/// `source` of a job.
pub async fn push_dir(store: &Store, dir: &Path) -> anyhow::Result<(Digest, u64)> {
    let (file, digest) = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || pack_dir(&dir)).await??
    };
    let size = put_bundle(store, file, &digest)
        .await
        .with_context(|| format!("uploading the bundle of {}", dir.display()))?;
    Ok((digest, size))
}

/// Puts a packed bundle in `store`; returns its size.
pub async fn put_bundle(
    store: &Store,
    file: NamedTempFile,
    digest: &Digest,
) -> anyhow::Result<u64> {
    let size = file.as_file().metadata()?.len();
    // The store adopts the file by renaming it (the temp file's own clean-up then finds
    // nothing), or copies it and the temp file is removed when dropped.
    store.put_blob_file(file.path(), digest, size).await?;
    Ok(size)
}
