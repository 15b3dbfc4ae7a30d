//! `corral snapshot`: write a directory as a deterministic OCI layer and print what was
//! written as one JSON object: `{digest, diff_id, size, tar_size, media_type, entries,
//! setid_stripped, skipped}`. On failure, prints `{error, message, tree_fault}` and exits
//! with 65 when the tree is at fault (hostile or over a cap), 75 otherwise.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::Context;

use crate::cli::{DeviceChoice, LayerCompression, SnapshotArgs};
use crate::exit;
use crate::layer::{
    Compression, DevicePolicy, IdMap, LayerOptions, Mode, SetIdPolicy, write_layer,
};

pub fn run(args: SnapshotArgs) -> anyhow::Result<u8> {
    let opts = options(&args)?;
    let partial = {
        let mut name = args.output.clone().into_os_string();
        name.push(".partial");
        PathBuf::from(name)
    };
    let file = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    // Large writes already come in blocks; the buffer only batches the small header writes.
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let result = write_layer(&args.dir, &opts, &mut out).and_then(|summary| {
        // No fsync: a store that needs durability copies or uploads the blob itself.
        out.into_inner()
            .map_err(|e| e.into_error())
            .map_err(|source| crate::layer::LayerError::Write { source })?;
        Ok(summary)
    });
    match result {
        Ok(summary) => {
            std::fs::rename(&partial, &args.output)
                .with_context(|| format!("renaming {} into place", partial.display()))?;
            let skipped: Vec<_> = summary
                .skipped
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "path": s.path.to_string_lossy(),
                        "reason": s.reason.as_str(),
                    })
                })
                .collect();
            crate::outln!(
                "{}",
                serde_json::json!({
                    "digest": summary.digest,
                    "diff_id": summary.diff_id,
                    "size": summary.size,
                    "tar_size": summary.tar_size,
                    "media_type": summary.media_type,
                    "entries": summary.entries,
                    "setid_stripped": summary.setid_stripped,
                    "skipped": skipped,
                })
            )?;
            Ok(exit::SUCCESS)
        }
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            let message = chain(&err);
            eprintln!("corral: snapshot failed: {message}");
            crate::outln!(
                "{}",
                serde_json::json!({
                    "error": err.kind(),
                    "message": message,
                    "tree_fault": err.is_tree_fault(),
                })
            )?;
            Ok(if err.is_tree_fault() {
                exit::INVALID_INPUT
            } else {
                exit::PLATFORM_ERROR
            })
        }
    }
}

/// The error with its causes, as one line.
fn chain(err: &crate::layer::LayerError) -> String {
    let mut chain = vec![err.to_string()];
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    chain.join(": ")
}

fn options(args: &SnapshotArgs) -> anyhow::Result<LayerOptions> {
    let compression = match args.compression {
        LayerCompression::Gzip => Compression::Gzip {
            level: u32::try_from(args.level.unwrap_or(6)).context("--level must be 1..=9")?,
        },
        LayerCompression::Zstd => Compression::Zstd {
            level: args.level.unwrap_or(3),
        },
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let mut id_map = IdMap::identity();
    for &(host, inner) in &args.map_uid {
        id_map = id_map.uid(host, inner);
    }
    for &(host, inner) in &args.map_gid {
        id_map = id_map.gid(host, inner);
    }
    Ok(LayerOptions {
        epoch: args.epoch,
        compression,
        threads,
        mode: if args.plain { Mode::Plain } else { Mode::Upper },
        id_map,
        setid: if args.keep_setid {
            SetIdPolicy::Keep
        } else {
            SetIdPolicy::Strip
        },
        devices: match args.devices {
            DeviceChoice::Skip => DevicePolicy::Skip,
            DeviceChoice::Refuse => DevicePolicy::Refuse,
            DeviceChoice::Keep => DevicePolicy::Keep,
        },
        max_output_bytes: args.max_output_bytes,
        max_tar_bytes: args.max_tar_bytes,
        ..LayerOptions::default()
    })
}
