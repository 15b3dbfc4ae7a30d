//! `corral validate`: check job messages the way a worker would, without running them.

use crate::cli::ValidateArgs;
use crate::exit;

pub fn run(args: ValidateArgs) -> anyhow::Result<u8> {
    let mut code = exit::SUCCESS;
    for file in &args.files {
        let bytes = super::read_input(file)?;
        let verdict = corral_protocol::decode_job(&bytes);
        let name = file.display();
        match (&verdict, args.json) {
            (Ok(job), true) => crate::outln!(
                "{}",
                serde_json::json!({"file": name.to_string(), "valid": true, "job_id": job.job_id, "project": job.project})
            )?,
            (Ok(job), false) => crate::outln!(
                "{name}: valid job {} of project {}",
                job.job_id,
                job.project
            )?,
            (Err(err), true) => crate::outln!(
                "{}",
                serde_json::json!({"file": name.to_string(), "valid": false, "error": err})
            )?,
            (Err(err), false) => crate::outln!("{name}: invalid: {err} [{}]", err.rule)?,
        }
        if verdict.is_err() {
            code = exit::INVALID_INPUT;
        }
    }
    Ok(code)
}
