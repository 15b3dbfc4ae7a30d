//! `corral base build|import|list|show`: make and inspect the bases builds run on.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::base::prerequisites::{self, Install, Role};
use crate::base::{
    Base, BaseError, Catalogue, IfExists, Origin, Progress, Recipe, Step, human_size,
};
use crate::cli::{BaseBuildArgs, BaseCommand, BaseImportArgs, BaseListArgs, BaseShowArgs};
use crate::exit;

pub fn run(command: BaseCommand) -> anyhow::Result<u8> {
    let outcome = match command {
        BaseCommand::Build(args) => build(args),
        BaseCommand::Import(args) => import(args),
        BaseCommand::List(args) => list(args),
        BaseCommand::Show(args) => show(args),
    };
    match outcome {
        Ok(()) => Ok(exit::SUCCESS),
        Err(err) => match err.downcast::<BaseError>() {
            Ok(err) => {
                eprintln!("corral: error: {err}");
                Ok(exit_code(&err))
            }
            // A closed or failing standard output: `exit::code` decides.
            Err(other) => Err(other),
        },
    }
}

/// Whose fault a failure is: the input's (a bad name or tarball: fix it) or the host's
/// (a mirror, a disk, a tool: retrying may help).
fn exit_code(err: &BaseError) -> u8 {
    match err {
        BaseError::Unknown { .. }
        | BaseError::Exists { .. }
        | BaseError::Open { .. }
        | BaseError::ReadTar { .. }
        | BaseError::Format { .. }
        | BaseError::Hostile { .. }
        | BaseError::ReadRecipe { .. }
        | BaseError::ParseRecipe { .. } => exit::INVALID_INPUT,
        _ => exit::PLATFORM_ERROR,
    }
}

fn if_exists(replace: bool) -> IfExists {
    if replace {
        IfExists::Replace
    } else {
        IfExists::Fail
    }
}

fn build(args: BaseBuildArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::open(&args.data_dir.dir)?;
    let recipe = match &args.recipe {
        Some(path) => {
            let mut recipe = Recipe::load(path)?;
            recipe.mirror = args.mirror.or(recipe.mirror);
            recipe.docs |= args.docs;
            recipe
        }
        None => Recipe {
            suite: args.suite,
            include: args.include,
            mirror: args.mirror,
            docs: args.docs,
        },
    };
    let install = Install::for_host(args.no_install);
    let base = build_with_progress(
        &catalogue,
        &args.name,
        &recipe,
        if_exists(args.replace),
        &install,
    )?;
    summarise(&base)?;
    Ok(())
}

/// Builds a base with debootstrap, showing its progress (shared with `corral replay`,
/// which creates missing fixture bases on first use). A missing debootstrap is installed
/// first when `install` allows it, and named with its package otherwise.
pub(crate) fn build_with_progress(
    catalogue: &Catalogue,
    name: &corral_protocol::BaseName,
    recipe: &Recipe,
    if_exists: IfExists,
    install: &Install,
) -> Result<Base, BaseError> {
    prerequisites::ensure(Role::Base, install, &mut |line| eprintln!("corral: {line}"))?;
    eprintln!(
        "corral: building base {} with debootstrap ({} minbase{}{}); this takes a few minutes (about 3 on 2 cores)",
        name,
        recipe.suite,
        if recipe.include.is_empty() { "" } else { " + " },
        recipe.include.join(","),
    );
    let mut display = Display::new();
    let base = catalogue.build(name, recipe, if_exists, &mut |p| display.report(p));
    display.finish();
    base
}

fn import(args: BaseImportArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::open(&args.data_dir.dir)?;
    let mut display = Display::new();
    let base = catalogue.import(
        &args.name,
        &args.tarball,
        if_exists(args.replace),
        &mut |p| display.report(p),
    );
    display.finish();
    summarise(&base?)?;
    Ok(())
}

fn summarise(base: &Base) -> anyhow::Result<()> {
    let info = &base.info;
    crate::outln!(
        "base {}: {}, {} files, layer {}, in {}",
        info.name,
        human_size(info.size),
        info.files,
        info.layer
            .as_ref()
            .map_or_else(|| "not computed".to_string(), |l| l.digest.to_string()),
        base.dir().display()
    )
}

fn list(args: BaseListArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::open(&args.data_dir.dir)?;
    let bases = catalogue.list()?;
    if args.json {
        let infos: Vec<_> = bases.iter().map(|b| &b.info).collect();
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&infos).expect("base infos serialise")
        )?;
        return Ok(());
    }
    if bases.is_empty() {
        eprintln!(
            "no bases in {}; create one with `corral base build` or `corral base import`",
            catalogue.dir().display()
        );
        return Ok(());
    }
    let rows: Vec<[String; 6]> = bases
        .iter()
        .map(|b| {
            let info = &b.info;
            [
                info.name.to_string(),
                human_size(info.size),
                info.files.to_string(),
                info.created.at.clone(),
                origin_text(&info.created.origin),
                info.layer
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |l| l.digest.to_string()),
            ]
        })
        .collect();
    let header = ["NAME", "SIZE", "FILES", "CREATED", "ORIGIN", "LAYER DIGEST"].map(String::from);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, width))| match i {
                1 | 2 => format!("{cell:>width$}"),
                5 => cell.clone(),
                _ => format!("{cell:<width$}"),
            })
            .collect();
        crate::outln!("{}", cells.join("  "))?;
    }
    Ok(())
}

fn origin_text(origin: &Origin) -> String {
    match origin {
        Origin::Debootstrap { suite, include, .. } if include.is_empty() => {
            format!("debootstrap {suite}")
        }
        Origin::Debootstrap { suite, include, .. } => {
            format!("debootstrap {suite} +{}", include.join(","))
        }
        Origin::Import { file, .. } => format!(
            "import {}",
            file.file_name()
                .unwrap_or(file.as_os_str())
                .to_string_lossy()
        ),
    }
}

fn show(args: BaseShowArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::open(&args.data_dir.dir)?;
    let base = catalogue.get(&args.name)?;
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&base.info).expect("base info serialises")
        )?;
    } else {
        let info = &base.info;
        crate::outln!("name:    {}", info.name)?;
        crate::outln!("rootfs:  {}", base.rootfs().display())?;
        crate::outln!("size:    {} ({} bytes)", human_size(info.size), info.size)?;
        crate::outln!("files:   {}", info.files)?;
        crate::outln!("created: {} by {}", info.created.at, info.created.by)?;
        crate::outln!("origin:  {}", origin_text(&info.created.origin))?;
        match &info.layer {
            Some(layer) => {
                crate::outln!("layer:   {} ({})", layer.digest, human_size(layer.size))?;
                crate::outln!("diff_id: {}", layer.diff_id)?;
            }
            None => crate::outln!("layer:   not computed")?,
        }
    }
    Ok(())
}

/// Shows a creation's steps: a live bar on a terminal, one line per finished step otherwise
/// (logs and CI keep those).
struct Display {
    bar: Option<ProgressBar>,
    started: Instant,
    step: Option<(Step, Instant, u64)>,
}

impl Display {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:>9} {wide_msg} {elapsed:>4}")
                    .expect("a valid template")
                    .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Display {
            bar,
            started: Instant::now(),
            step: None,
        }
    }

    fn report(&mut self, progress: Progress<'_>) {
        match progress {
            Progress::Step(step) => {
                self.end_step();
                self.step = Some((step, Instant::now(), 0));
                match &self.bar {
                    Some(bar) => {
                        bar.set_prefix(step.as_str());
                        bar.set_message("");
                    }
                    None => eprintln!("{} {}...", self.stamp(), step.as_str()),
                }
            }
            Progress::Item {
                name, done, total, ..
            } => {
                if let Some((_, _, items)) = &mut self.step {
                    *items = done;
                }
                if let Some(bar) = &self.bar {
                    bar.set_message(match total {
                        Some(total) => format!("{done:>4}/{total:<4} {name}"),
                        None => format!("{done:>4} {name}"),
                    });
                }
            }
            Progress::Note(note) => match &self.bar {
                Some(bar) => bar.println(note),
                None => eprintln!("{} {note}", self.stamp()),
            },
        }
    }

    fn end_step(&mut self) {
        if let Some((step, started, items)) = self.step.take() {
            let took = started.elapsed().as_secs_f64();
            let items = if items > 0 {
                format!(", {items} items")
            } else {
                String::new()
            };
            let line = format!(
                "{} {} done in {took:.1}s{items}",
                self.stamp(),
                step.as_str()
            );
            match &self.bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        }
    }

    fn stamp(&self) -> String {
        format!("[{:>6.1}s]", self.started.elapsed().as_secs_f64())
    }

    fn finish(&mut self) {
        self.end_step();
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
