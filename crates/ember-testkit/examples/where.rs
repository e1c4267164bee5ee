//! Prints where the shared data, the SmolLM2 folder and the reference Python are, or why a test
//! needing them would skip: `cargo run -p ember-testkit --example where`.

fn main() {
    println!(
        "shared:           {}",
        ember_testkit::shared_dir().display()
    );
    println!("all-MiniLM-L6-v2: {:?}", ember_testkit::minilm());
    println!("SmolLM2:          {:?}", ember_testkit::smollm2());
    println!("reference Python: {:?}", ember_testkit::reference_python());
}
