from lora_trainer.cli import main

main()
