//! Pushes the image tagged TAG in an OCI image layout to a store the way a worker publishes
//! a build: each layer with `Store::put_blob_file` (HEAD, then a mount or a streamed
//! upload), then the image with `image::publish` (layers checked, config, manifest).
//! Prints one JSON line: the manifest digest, the seconds taken, each layer's outcome.
//! `scripts/bench-upload` times it against `skopeo copy` of the same layout.
//!
//!     cargo run --release --example push_image -- LAYOUT TAG STORE_URL [MOUNT_FROM...]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use corral_protocol::{Digest, Layer};
use corral_worker::image::Image;
use corral_worker::store::{PutOutcome, Store, StoreOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [layout, tag, url, mount_from @ ..] = args.as_slice() else {
        bail!("usage: push_image LAYOUT TAG STORE_URL [MOUNT_FROM...]");
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(push(Path::new(layout), tag, url, mount_from))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join("blobs/sha256").join(digest.hex())
}

async fn push(layout: &Path, tag: &str, url: &str, mount_from: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let index = read_json(&layout.join("index.json"))?;
    let entry = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .with_context(|| format!("no image tagged {tag} in {}", layout.display()))?;
    let manifest_digest = Digest::parse(entry["digest"].as_str().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let manifest_bytes = std::fs::read(blob_path(layout, &manifest_digest))?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes)?;
    let config_digest = Digest::parse(manifest["config"]["digest"].as_str().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let config = std::fs::read(blob_path(layout, &config_digest))?;
    let config_json: serde_json::Value = serde_json::from_slice(&config)?;
    let diff_ids = config_json["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();

    let store = Store::open_with(
        url,
        StoreOptions {
            mount_from: mount_from.to_vec(),
            ..StoreOptions::default()
        },
    )
    .await?;
    let mut layers = Vec::new();
    let mut outcomes = Vec::new();
    for (i, layer) in manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let digest = Digest::parse(layer["digest"].as_str().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let size = layer["size"].as_u64().context("a layer without size")?;
        let diff_id = Digest::parse(diff_ids.get(i).and_then(|d| d.as_str()).unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let outcome = store
            .put_blob_file(&blob_path(layout, &digest), &digest, size)
            .await?;
        outcomes.push(match outcome {
            PutOutcome::Uploaded => "uploaded",
            PutOutcome::AlreadyPresent => "present",
            PutOutcome::Mounted => "mounted",
        });
        layers.push(Layer {
            digest,
            diff_id,
            size,
            media_type: layer["mediaType"].as_str().unwrap_or_default().to_string(),
        });
    }
    let image = Image {
        config,
        config_digest,
        manifest: manifest_bytes,
        manifest_digest: manifest_digest.clone(),
        manifest_media_type: corral_worker::store::MEDIA_TYPE_MANIFEST,
    };
    let (digest, _) = corral_worker::image::publish(&store, tag, &layers, &image).await?;
    if digest != manifest_digest {
        bail!("the store took the manifest as {digest}, expected {manifest_digest}");
    }
    println!(
        "{}",
        serde_json::json!({
            "manifest": digest,
            "seconds": started.elapsed().as_secs_f64(),
            "layers": outcomes,
        })
    );
    Ok(())
}
