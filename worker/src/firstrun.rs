//! What a fixture job needs on its first `corral replay`, made once and announced step by
//! step: a writable data dir, the host tools (installed with apt where that is allowed),
//! the base (debootstrap, with progress), the pinned wheels and the source bundle
//! (`scripts/fixtures`, then a deterministic pack pushed to the store). Every failure says
//! what was being done, on what, and what to do, with the exit code of its kind.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use corral_protocol::Job;

use crate::base::prerequisites::{self, Install, Role, seconds};
use crate::base::{BaseError, Catalogue, IfExists, Recipe};
use crate::exit;
use crate::store::Store;

/// Where `scripts/fixtures` keeps the wheels it fetches (`CORRAL_WHEEL_CACHE`).
pub const DEFAULT_WHEEL_CACHE: &str = "/var/cache/corral/wheels";

/// A step that failed: the error to print and the exit code it means.
#[derive(Debug)]
pub struct PrepareError {
    pub code: u8,
    pub error: anyhow::Error,
}

impl PrepareError {
    fn platform(error: impl Into<anyhow::Error>) -> Self {
        PrepareError {
            code: exit::PLATFORM_ERROR,
            error: error.into(),
        }
    }

    fn base(error: BaseError) -> Self {
        let code = match error {
            BaseError::ReadRecipe { .. } | BaseError::ParseRecipe { .. } => exit::INVALID_INPUT,
            _ => exit::PLATFORM_ERROR,
        };
        PrepareError {
            code,
            error: error.into(),
        }
    }
}

fn say(text: impl std::fmt::Display) {
    // Never a panic when stderr is gone (a closed pipe): stopping must not depend on it.
    let _ = writeln!(std::io::stderr(), "corral: {text}");
}

/// Makes `dir` and checks that files can be made in it, before anything is written there.
pub fn check_data_dir(dir: &Path) -> Result<(), PrepareError> {
    let fix = "pass --data-dir DIR with a directory you can write, or make this one writable";
    let unwritable = |doing: String, err: std::io::Error| {
        PrepareError::platform(anyhow::anyhow!(
            "the data dir {} is not writable: {doing}: {err}; {fix}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| unwritable(format!("creating {}", dir.display()), e))?;
    tempfile::Builder::new()
        .prefix(".corral-write-check")
        .tempfile_in(dir)
        .map_err(|e| unwritable(format!("creating a file in {}", dir.display()), e))?;
    Ok(())
}

/// `fixtures/` when the job file sits in `fixtures/jobs/` (or any `jobs/` beside `bases/`
/// and `bundles/`).
pub fn fixtures_dir(job_file: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(job_file)
        .ok()?
        .parent()?
        .parent()?
        .to_path_buf();
    (dir.join("bundles").is_dir() || dir.join("bases").is_dir()).then_some(dir)
}

/// Makes sure the tools every build needs are on this host (`run` in the host package
/// list: mkfs.ext4 for the disk limit, mount, modprobe), installing what is missing when
/// `install` allows it.
pub fn ensure_run_tools(install: &Install) -> Result<(), PrepareError> {
    prerequisites::ensure(Role::Run, install, &mut |line| say(line)).map_err(PrepareError::platform)
}

/// Creates the job's base and source bundle from `fixtures` when they are missing.
pub async fn prepare(
    catalogue: &Catalogue,
    store: &Store,
    job: &Job,
    fixtures: &Path,
    install: &Install,
) -> Result<(), PrepareError> {
    prepare_base(catalogue, job, fixtures, install).await?;
    prepare_source(store, job, fixtures, install).await
}

async fn prepare_base(
    catalogue: &Catalogue,
    job: &Job,
    fixtures: &Path,
    install: &Install,
) -> Result<(), PrepareError> {
    match catalogue.get(&job.base) {
        Ok(_) => return Ok(()),
        Err(BaseError::Unknown { .. }) => {}
        Err(err) => return Err(PrepareError::base(err)),
    }
    let recipe_path = fixtures.join("bases").join(format!("{}.json", job.base));
    if !recipe_path.is_file() {
        return Ok(()); // The pipeline answers with the typed unknown-base error.
    }
    let recipe = Recipe::load(&recipe_path).map_err(PrepareError::base)?;
    say(format_args!(
        "first run: base {} is not in {}; creating it from {} (once)",
        job.base,
        catalogue.dir().display(),
        recipe_path.display()
    ));
    let started = Instant::now();
    let (catalogue, name, install) = (catalogue.clone(), job.base.clone(), install.clone());
    let base = tokio::task::spawn_blocking(move || {
        crate::cmd::base::build_with_progress(&catalogue, &name, &recipe, IfExists::Keep, &install)
    })
    .await
    .map_err(PrepareError::platform)?
    .map_err(PrepareError::base)?;
    say(format_args!(
        "base {} ready in {} ({}, {} files)",
        base.info.name,
        seconds(started.elapsed()),
        crate::base::human_size(base.info.size),
        base.info.files
    ));
    Ok(())
}

/// Finds the fixture bundle whose deterministic packing has the job's source digest and
/// pushes it, when the store lacks it.
async fn prepare_source(
    store: &Store,
    job: &Job,
    fixtures: &Path,
    install: &Install,
) -> Result<(), PrepareError> {
    let digest = &job.source.digest;
    let present = store.has_blob(digest).await.map_err(|e| {
        PrepareError::platform(anyhow::Error::new(e).context(format!(
            "looking up the source bundle {digest} in the store"
        )))
    })?;
    if present {
        return Ok(());
    }
    let bundles = fixtures.join("bundles");
    let Ok(entries) = std::fs::read_dir(&bundles) else {
        return Ok(());
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let setup = fixtures.parent().map(|repo| repo.join("scripts/fixtures"));
    if let Some(setup) = setup.filter(|s| s.is_file()) {
        let cache = std::env::var_os("CORRAL_WHEEL_CACHE")
            .map_or_else(|| PathBuf::from(DEFAULT_WHEEL_CACHE), PathBuf::from);
        say(format_args!(
            "first run: source {digest} is not in the store; preparing the fixture bundles \
             with {} (the python-app wheels, fetched once into {}; CORRAL_WHEEL_CACHE moves it)",
            setup.display(),
            cache.display()
        ));
        prerequisites::ensure(Role::Fixtures, install, &mut |line| say(line))
            .map_err(PrepareError::platform)?;
        let started = Instant::now();
        let status = tokio::process::Command::new(&setup)
            .status()
            .await
            .map_err(|e| {
                PrepareError::platform(anyhow::anyhow!(
                    "running {}: {e}; run it yourself to see why",
                    setup.display()
                ))
            })?;
        if !status.success() {
            return Err(PrepareError::platform(anyhow::anyhow!(
                "{} failed ({status}); its messages are above. It needs python3 with pip \
                 (or python3-venv) and, unless {} already holds the pinned wheels, access to \
                 the Python package index",
                setup.display(),
                cache.display()
            )));
        }
        say(format_args!(
            "fixture bundles ready in {}",
            seconds(started.elapsed())
        ));
    }
    let started = Instant::now();
    for dir in dirs {
        let (file, packed) = {
            let dir = dir.clone();
            let shown = dir.display().to_string();
            tokio::task::spawn_blocking(move || crate::cmd::source::pack_dir(&dir))
                .await
                .map_err(PrepareError::platform)?
                .map_err(|e| PrepareError::platform(e.context(format!("packing {shown}"))))?
        };
        if &packed != digest {
            continue;
        }
        crate::cmd::source::put_bundle(store, file, digest)
            .await
            .map_err(|e| {
                PrepareError::platform(e.context(format!("storing the bundle {}", dir.display())))
            })?;
        say(format_args!(
            "pushed fixture bundle {} as {digest} in {}",
            dir.display(),
            seconds(started.elapsed())
        ));
        return Ok(());
    }
    Ok(())
}
