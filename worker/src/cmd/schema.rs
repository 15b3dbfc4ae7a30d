//! `corral schema`: print or write the JSON Schemas of the wire messages.

use anyhow::Context;

use crate::cli::SchemaArgs;
use crate::exit;

pub fn run(args: SchemaArgs) -> anyhow::Result<u8> {
    let schemas = corral_protocol::schemas();
    if let Some(dir) = args.write {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, schema) in schemas {
            let path = dir.join(&name);
            let text = serde_json::to_string_pretty(&schema)? + "\n";
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            crate::outln!("wrote {}", path.display())?;
        }
        return Ok(exit::SUCCESS);
    }
    let wanted = format!("corral.{}.v1.schema.json", args.message);
    let (_, schema) = schemas
        .into_iter()
        .find(|(name, _)| *name == wanted)
        .context("no such message")?;
    crate::outln!("{}", serde_json::to_string_pretty(&schema)?)?;
    Ok(exit::SUCCESS)
}
