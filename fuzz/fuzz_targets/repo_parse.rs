//! The repository's own metadata, as a hostile repository could hold it:
//! manifests (self-digest, then the name rules on whatever JSON parses),
//! index and chunk blobs with their ceilings, index plaintext, and pack
//! trailers. Nothing may panic or allocate past a ceiling.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vsnap_repo::validate::exercise(data);
});
