from local_sagemaker.server import main

main()
