//! Cache keys: what a step's result depends on, hashed.
//!
//! A step's output is a function of the image it boots, its input layers (in order)
//! and the files of its control layer (the synthesized workflow and `.actrc`). Two
//! steps with the same key would run the same program on the same bytes; the key is
//! recorded on every layer snapshot so such a step can later be skipped.

use sha2::{Digest, Sha256};

/// Inputs of a step's cache key.
#[derive(Debug, Clone)]
pub struct StepInputs<'a> {
    /// Content id of the guest image (kernel + initramfs).
    pub image_id: &'a str,
    /// Layer ids of the inputs, bottom first (base, workspace, earlier steps).
    pub layers: &'a [String],
    /// `/.actrc` of the control layer.
    pub actrc: &'a str,
    /// `/.udos/step.yml` of the control layer.
    pub workflow_yaml: &'a str,
}

/// Format version of the key; bump when what goes into it changes.
const KEY_VERSION: &str = "udos-step-key-v1";

/// The step's cache key: 64 hex digits.
pub fn step_key(inputs: &StepInputs<'_>) -> String {
    let mut h = Sha256::new();
    // Every field is length-prefixed so that no two different inputs concatenate alike.
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(KEY_VERSION.as_bytes());
    field(inputs.image_id.as_bytes());
    field(&(inputs.layers.len() as u64).to_le_bytes());
    for l in inputs.layers {
        field(l.as_bytes());
    }
    field(inputs.actrc.as_bytes());
    field(inputs.workflow_yaml.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(image: &str, layers: &[&str], yaml: &str) -> String {
        let layers: Vec<String> = layers.iter().map(|s| s.to_string()).collect();
        step_key(&StepInputs {
            image_id: image,
            layers: &layers,
            actrc: "-W\nx\n",
            workflow_yaml: yaml,
        })
    }

    #[test]
    fn key_depends_on_every_input_and_order() {
        let base = key("img", &["a", "b"], "y");
        assert_eq!(base.len(), 64);
        assert_eq!(base, key("img", &["a", "b"], "y"));
        assert_ne!(base, key("img2", &["a", "b"], "y"));
        assert_ne!(base, key("img", &["b", "a"], "y"));
        assert_ne!(base, key("img", &["ab"], "y"));
        assert_ne!(base, key("img", &["a", "b"], "y2"));
    }
}
