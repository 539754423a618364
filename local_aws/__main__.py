from local_aws.server import main

main()
