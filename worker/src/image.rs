//! The OCI image of a build: an image config whose `rootfs.diff_ids` list the layers
//! [base, source, build] in order, and a manifest naming that config and those layers.
//! Platform linux/amd64. The JSON is deterministic: fixed field order, sorted maps, no
//! wall-clock time (the `created` time is the job's `source_date_epoch`), so the same
//! layers and settings always give the same manifest digest.

use std::collections::BTreeMap;

use corral_protocol::{Digest, Layer};
use serde::Serialize;

use crate::store::{MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, Store, StoreError, sha256_bytes};

/// What goes into the image besides its layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSettings {
    /// Seconds since the Unix epoch: the image's `created` time.
    pub created_epoch: u64,
    /// `KEY=VALUE` environment of a container started from the image.
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub labels: BTreeMap<String, String>,
    /// Manifest annotations (job id, project…).
    pub annotations: BTreeMap<String, String>,
}

/// An image ready to store: put `config` as a blob, then `manifest` under a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub manifest_media_type: &'static str,
}

#[derive(Serialize)]
struct Config<'a> {
    created: String,
    architecture: &'static str,
    os: &'static str,
    config: RunConfig<'a>,
    rootfs: RootFs<'a>,
    history: Vec<History>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    env: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    cmd: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    working_dir: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<&'a Digest>,
}

#[derive(Serialize)]
struct History {
    created: String,
    created_by: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor<'a>,
    layers: Vec<Descriptor<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor<'a> {
    media_type: &'a str,
    digest: &'a Digest,
    size: u64,
}

/// Names of the layers in the image history, in order.
const LAYER_ROLES: [&str; 3] = ["base", "source", "build"];

/// Builds the config and manifest for `layers` (normally [base, source, build]).
pub fn build(layers: &[Layer], settings: &ImageSettings) -> Image {
    let created = rfc3339(settings.created_epoch);
    let config = Config {
        created: created.clone(),
        architecture: "amd64",
        os: "linux",
        config: RunConfig {
            env: &settings.env,
            cmd: &settings.cmd,
            working_dir: &settings.working_dir,
            labels: &settings.labels,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| &l.diff_id).collect(),
        },
        history: (0..layers.len())
            .map(|i| History {
                created: created.clone(),
                created_by: format!("corral: {} layer", LAYER_ROLES.get(i).unwrap_or(&"extra")),
            })
            .collect(),
    };
    let config = serde_json::to_vec(&config).expect("an image config always serializes");
    let config_digest = sha256_bytes(&config);
    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_MANIFEST,
        config: Descriptor {
            media_type: MEDIA_TYPE_CONFIG,
            digest: &config_digest,
            size: config.len() as u64,
        },
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: &l.media_type,
                digest: &l.digest,
                size: l.size,
            })
            .collect(),
        annotations: &settings.annotations,
    };
    let manifest = serde_json::to_vec(&manifest).expect("a manifest always serializes");
    let manifest_digest = sha256_bytes(&manifest);
    Image {
        config,
        config_digest,
        manifest,
        manifest_digest,
        manifest_media_type: MEDIA_TYPE_MANIFEST,
    }
}

/// Stores `image` (whose layer blobs must be in the store already) under `tag`: checks
/// every layer is there, puts the config, then the manifest. Returns the manifest digest
/// and the reference a user gives skopeo. A manifest never names a missing blob.
pub async fn publish(
    store: &Store,
    tag: &str,
    layers: &[Layer],
    image: &Image,
) -> Result<(Digest, String), StoreError> {
    let digests: Vec<Digest> = layers.iter().map(|l| l.digest.clone()).collect();
    debug_assert_eq!(sha256_bytes(&image.config), image.config_digest);
    let digest = store
        .publish_image(
            tag,
            &digests,
            &image.config,
            &image.manifest,
            image.manifest_media_type,
        )
        .await?;
    Ok((digest, store.reference(tag)))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (proleptic Gregorian, UTC).
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MEDIA_TYPE_LAYER_GZIP;

    fn layer(n: u8) -> Layer {
        Layer {
            digest: Digest::from_sha256([n; 32]),
            diff_id: Digest::from_sha256([n + 100; 32]),
            size: u64::from(n) * 10,
            media_type: MEDIA_TYPE_LAYER_GZIP.into(),
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn diff_ids_follow_the_layers_and_bytes_are_stable() {
        let layers = [layer(1), layer(2), layer(3)];
        let settings = ImageSettings {
            created_epoch: 1_700_000_000,
            env: vec!["PATH=/usr/bin".into()],
            working_dir: "/app".into(),
            ..ImageSettings::default()
        };
        let a = build(&layers, &settings);
        assert_eq!(a, build(&layers, &settings));
        let config: serde_json::Value = serde_json::from_slice(&a.config).unwrap();
        let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        let expected: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        assert_eq!(diff_ids, expected);
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["history"].as_array().unwrap().len(), 3);
        let manifest: serde_json::Value = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(manifest["config"]["digest"], a.config_digest.as_str());
        assert_eq!(manifest["config"]["size"], a.config.len());
        assert_eq!(manifest["layers"][2]["digest"], layers[2].digest.as_str());
        assert_eq!(a.manifest_digest, sha256_bytes(&a.manifest));
    }
}
